// Included first in every source file (CMakeLists.txt): bind the two libm functions whose newest
// glibc versions (2.29) would raise the wheel's manylinux floor to their older versions, so the
// libraries load on glibc 2.28 (manylinux_2_28, torch's own floor). Same maths; the old entry
// points add glibc's error-handling wrapper.
#pragma once
#if defined(__linux__) && defined(__x86_64__) && !defined(__CUDACC__)
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
#endif
