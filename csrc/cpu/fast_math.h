// Vectorizable float math shared by the CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastcl {

// Always inlined, so they take the instruction set of the (possibly target-cloned) caller.
#if defined(__GNUC__)
#define FASTCL_INLINE inline __attribute__((always_inline))
#else
#define FASTCL_INLINE inline
#endif

// The build passes -fno-trapping-math (CMakeLists.txt), so comparisons and selects in loop
// bodies if-convert and vectorize.
FASTCL_INLINE float min_with_zero(float x) { return x > 0.0f ? 0.0f : x; }  // NaN stays NaN

// The numerics contract of every CPU kernel: exp of an argument <= 0 (down to -inf) is either
// accurate or exactly 0, never a subnormal, and NaN stays NaN. Below the flush threshold the
// value is under 2^-64 (float) / 2^-93 (double) of the largest term of its row (whose exp is 1):
// 2^40 times smaller than the rounding error of the sums and products it would enter, so
// flushing it cannot change a result at that precision, while a subnormal (or a normal value
// that tiny times a key element) would make the gradient products crawl on x86.
constexpr float kExpFlushFloat = -44.3614196f;        // -64 ln 2
constexpr double kExpFlushDouble = -64.4627388569;    // -93 ln 2

// exp(x) for x <= 0: Cody-Waite range reduction and a degree-6 polynomial (about 2 ulp),
// written with selects, not branches, so the loops calling it vectorize (std::exp does not).
// Huge negative arguments (-1e30, -inf) are clamped by a comparison, which loses nothing
// (the arithmetic clamp it replaces rounded x + 87 and returned garbage past |x| ~ 2^27).
FASTCL_INLINE float exp_nonpositive(float x) {
  const float clamped = x < kExpFlushFloat ? kExpFlushFloat : x;  // NaN compares false: stays NaN
  const float t = clamped * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  const float f = (clamped - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  // 2^n from its exponent bits (a union, which GCC vectorizes, unlike memcpy here); n is in
  // [-64, 0] (0 for NaN, whose polynomial is NaN anyway), so the bits are a normal float.
  const float n_bits = n == n ? n : 0.0f;
  union {
    int32_t bits;
    float value;
  } scale;
  scale.bits = static_cast<int32_t>(n_bits * 8388608.0f) + (127 << 23);  // (n + 127) << 23, exact
  return x < kExpFlushFloat ? 0.0f : p * scale.value;
}

// The float64 kernels use std::exp (exact to rounding), flushed at the same relative depth.
FASTCL_INLINE double exp_nonpositive(double x) { return x < kExpFlushDouble ? 0.0 : std::exp(x); }

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
