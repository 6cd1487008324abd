// Vectorizable float math shared by the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastcl {

// exp(x) for x <= 0: Cody-Waite range reduction and a degree-6 polynomial (about 2 ulp),
// branch-free so the loops calling it vectorize (std::exp does not).
// Always inlined, so they take the instruction set of the (possibly target-cloned) caller.
#if defined(__GNUC__)
#define FASTCL_INLINE inline __attribute__((always_inline))
#else
#define FASTCL_INLINE inline
#endif

// Clamps and sign selections are written as arithmetic (fabs / copysign): with GCC's default
// -ftrapping-math a float comparison in the loop body is "control flow" and blocks vectorization.
FASTCL_INLINE float max_with(float x, float floor) { return 0.5f * (x + floor + std::fabs(x - floor)); }
FASTCL_INLINE float min_with_zero(float x) { return 0.5f * (x - std::fabs(x)); }  // exact

FASTCL_INLINE float exp_nonpositive(float x) {
  x = max_with(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float f = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  // 2^n from its exponent bits (a union, which GCC vectorizes, unlike memcpy here).
  union {
    int32_t bits;
    float value;
  } scale;
  scale.bits = static_cast<int32_t>(n * 8388608.0f) + (127 << 23);  // (n + 127) << 23, exact; no vector shift needed
  return p * scale.value;
}

// log(1 + e) for e in [0, 1]: 2 atanh(t) with t = e / (2 + e) <= 1/3, by its series to t^13
// (truncation below 2e-8 relative; no cancellation for small e, where it tends to e).
FASTCL_INLINE float log1p_unit(float e) {
  const float t = e / (2.0f + e);
  const float t2 = t * t;
  float p = 1.0f / 13.0f;
  p = p * t2 + 1.0f / 11.0f;
  p = p * t2 + 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  return 2.0f * t * p;
}

}  // namespace fastcl
