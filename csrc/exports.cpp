// The C ABI of every fastcl library (one CPU library per instruction set, one CUDA library):
// fastcl/_native.py loads them with ctypes, lists their kernels and binds them by name.
#include "registry.h"

#ifdef FASTCL_WITH_OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cstring>
#include <string>

#if defined(_WIN32)
#define FASTCL_API extern "C" __declspec(dllexport)
#else
#define FASTCL_API extern "C" __attribute__((visibility("default")))
#endif

#ifndef FASTCL_CAPABILITY
#define FASTCL_CAPABILITY "default"
#endif
#ifndef FASTCL_CUDA_ARCHITECTURES
#define FASTCL_CUDA_ARCHITECTURES ""
#endif

namespace fastcl {

std::vector<ExportedFunction>& exported_functions() {
  static std::vector<ExportedFunction> list;
  return list;
}

namespace {
thread_local std::string last_error;
}

void set_last_error(const char* message) { last_error = message ? message : ""; }

int clamp_threads(int64_t requested) {
#ifdef FASTCL_WITH_OPENMP
  return static_cast<int>(std::max<int64_t>(1, requested));
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace fastcl

// Bumped whenever this ABI or the meaning of an exported kernel's arguments changes.
FASTCL_API int fastcl_abi_version() { return 1; }

FASTCL_API int64_t fastcl_function_count() { return static_cast<int64_t>(fastcl::exported_functions().size()); }

FASTCL_API const fastcl::ExportedFunction* fastcl_function(int64_t index) {
  const auto& list = fastcl::exported_functions();
  return index >= 0 && index < static_cast<int64_t>(list.size()) ? &list[static_cast<size_t>(index)] : nullptr;
}

FASTCL_API const char* fastcl_last_error() { return fastcl::last_error.c_str(); }

// What this library was built as: its CPU capability, OpenMP, CUDA and its CUDA architectures.
FASTCL_API const char* fastcl_capability() { return FASTCL_CAPABILITY; }

FASTCL_API int fastcl_with_openmp() {
#ifdef FASTCL_WITH_OPENMP
  return 1;
#else
  return 0;
#endif
}

FASTCL_API int fastcl_with_cuda() {
#ifdef FASTCL_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

FASTCL_API const char* fastcl_cuda_architectures() { return FASTCL_CUDA_ARCHITECTURES; }

// Whether this CPU (and its operating system, for the wider registers) runs a capability's
// library: "default" always; on x86-64 "avx2" (AVX2, FMA, BMI1/2, F16C, POPCNT: x86-64-v3 less
// MOVBE/LZCNT, which the library is not built with) and "avx512" (that plus AVX-512
// F/BW/CD/DQ/VL: x86-64-v4). "native" (FASTCL_NATIVE_ARCH) is loaded without asking. Asked of the default
// library, which is compiled for the baseline and so runs anywhere.
FASTCL_API int fastcl_cpu_supports(const char* capability) {
  if (std::strcmp(capability, "default") == 0) return 1;
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  // The same features CMakeLists.txt turns on for each library.
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c") &&
                  __builtin_cpu_supports("popcnt");
  if (std::strcmp(capability, "avx2") == 0) return v3 ? 1 : 0;
  if (std::strcmp(capability, "avx512") == 0)
    return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vl")
               ? 1
               : 0;
#endif
  return 0;
}
