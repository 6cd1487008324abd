#include "registry.h"

#ifdef FASTCL_WITH_OPENMP
#include <omp.h>
#endif

#include <algorithm>

namespace fastcl {

std::vector<Registrar>& registrars() {
  static std::vector<Registrar> list;
  return list;
}

int clamp_threads(int64_t requested) {
#ifdef FASTCL_WITH_OPENMP
  return static_cast<int>(std::max<int64_t>(1, requested));
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace fastcl

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastcl native kernels (pointer-based, independent of libtorch's ABI)";
#ifdef FASTCL_WITH_OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
#ifdef FASTCL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto registrar : fastcl::registrars()) registrar(m);
}
