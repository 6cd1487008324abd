// Each source file exports its kernels with FASTCL_EXPORT (name, argument names, doc, function),
// so adding an op means adding a file: no central list to edit. A library lists what it holds
// through a plain C ABI (exports.cpp), which fastcl/_native.py binds with ctypes: no Python
// headers and no libtorch, so one build serves every Python and every torch version.
//
// Kernels take raw pointers (as std::uintptr_t), sizes (int64_t), doubles, ints and bools, and
// return nothing; Python validates and allocates. A kernel that throws reaches Python as an
// exception (std::invalid_argument as ValueError, anything else as RuntimeError) through
// fastcl_last_error, never as a crash. ctypes releases the GIL around every call.
#pragma once

#include <cstdint>
#include <exception>
#include <stdexcept>
#include <vector>

namespace fastcl {

// One exported kernel. `address` is an `int (*)(arguments...) noexcept`: 0 on success, 1 for a
// runtime error, 2 for an invalid argument (the message is in fastcl_last_error()).
struct ExportedFunction {
  const char* name;
  const char* arguments;  // space-separated argument names, in order
  const char* types;      // one letter an argument: p pointer, q int64, i int32, d double, b bool
  const char* doc;
  void* address;
};

std::vector<ExportedFunction>& exported_functions();
void set_last_error(const char* message);

// Threads for an OpenMP region: the caller passes torch.get_num_threads() so fastcl never
// oversubscribes the cores torch is using.
int clamp_threads(int64_t requested);

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <typename T>
struct TypeCode;
template <>
struct TypeCode<std::uintptr_t> {
  static constexpr char value = 'p';
};
template <>
struct TypeCode<std::int64_t> {
  static constexpr char value = 'q';
};
template <>
struct TypeCode<int> {
  static constexpr char value = 'i';
};
template <>
struct TypeCode<double> {
  static constexpr char value = 'd';
};
template <>
struct TypeCode<bool> {
  static constexpr char value = 'b';
};

// The C entry point of a kernel: no exception crosses into ctypes.
template <auto Kernel>
struct Guarded;
template <typename... Args, void (*Kernel)(Args...)>
struct Guarded<Kernel> {
  static int call(Args... args) noexcept {
    try {
      Kernel(args...);
      return 0;
    } catch (const std::invalid_argument& error) {
      set_last_error(error.what());
      return 2;
    } catch (const std::exception& error) {
      set_last_error(error.what());
      return 1;
    } catch (...) {
      set_last_error("unknown C++ exception");
      return 1;
    }
  }
  static constexpr char types[sizeof...(Args) + 1] = {TypeCode<Args>::value..., '\0'};
};

struct Export {
  Export(const char* name, const char* arguments, const char* types, const char* doc, void* address) {
    exported_functions().push_back(ExportedFunction{name, arguments, types, doc, address});
  }
};

}  // namespace fastcl

#define FASTCL_CONCAT_INNER(a, b) a##b
#define FASTCL_CONCAT(a, b) FASTCL_CONCAT_INNER(a, b)
// FASTCL_EXPORT(info_nce_rows_f32, (info_nce_rows<float>), "similarity ld ...", "what it does");
// The kernel goes in parentheses when it is a template-id.
#define FASTCL_EXPORT(name, kernel, arguments, doc)                                                   \
  static ::fastcl::Export FASTCL_CONCAT(fastcl_export_, name)(                                        \
      #name, arguments, ::fastcl::Guarded<kernel>::types, doc,                                        \
      reinterpret_cast<void*>(&::fastcl::Guarded<kernel>::call))
