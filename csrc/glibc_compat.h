// Included first in every source file (CMakeLists.txt): bind the two libm functions whose newest
// glibc versions (2.29) would raise the wheel's manylinux floor to their older versions, so the
// libraries load on glibc 2.28 (manylinux_2_28, torch's own floor). Same maths; the old entry
// points add glibc's error-handling wrapper.
#pragma once
#if defined(__linux__) && !defined(__CUDACC__)
#include <features.h>  // defines __GLIBC__ (this header comes before any other)
#endif
#if defined(__linux__) && defined(__GLIBC__) && !defined(__CUDACC__)
#if defined(__x86_64__)
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
#elif defined(__aarch64__)
__asm__(".symver exp,exp@GLIBC_2.17");
__asm__(".symver log,log@GLIBC_2.17");
#endif
#endif
