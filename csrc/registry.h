// Each source file registers its own functions with FASTCL_REGISTER, so adding an op means
// adding a file: no central list to edit. Functions take raw pointers (as integers), sizes,
// strides and, for CUDA, a stream; Python validates and allocates. Nothing here links libtorch,
// so one build works with any torch version.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

namespace fastcl {

using Registrar = void (*)(pybind11::module_&);

std::vector<Registrar>& registrars();

struct Register {
  explicit Register(Registrar registrar) { registrars().push_back(registrar); }
};

// Threads for an OpenMP region: the caller passes torch.get_num_threads() so fastcl never
// oversubscribes the cores torch is using.
int clamp_threads(int64_t requested);

template <typename T>
inline T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace fastcl

#define FASTCL_CONCAT_INNER(a, b) a##b
#define FASTCL_CONCAT(a, b) FASTCL_CONCAT_INNER(a, b)
#define FASTCL_REGISTER(name)                                                       \
  static void FASTCL_CONCAT(fastcl_register_, name)(pybind11::module_ & m);         \
  static ::fastcl::Register FASTCL_CONCAT(fastcl_registrar_, name)(                  \
      FASTCL_CONCAT(fastcl_register_, name));                                        \
  static void FASTCL_CONCAT(fastcl_register_, name)(pybind11::module_ & m)
