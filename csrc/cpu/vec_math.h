// Elementwise math for the CPU kernels, written so that loops over it vectorise
// (no libm calls in the float path).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lnlm_ssm {

// exp for float without a libm call: range reduction by ln 2 (Cody-Waite split)
// and a degree-6 polynomial (Cephes' expf coefficients), within ~2 ulp of exp
// where the result is a normal float. Results below ~1e-38 flush to 0, x above
// ~88.38 gives +inf, NaN stays NaN. The edge cases cost three selects in all,
// which matters here: this sits in the innermost loop of every scan.
inline float exp_vec(float x) {
  constexpr float kLimit = 88.7f;  // |k| <= 128: the biased exponent below stays in [-1, 255]
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  // Written as selects so that a NaN passes through to the final select.
  float xc = x < -kLimit ? -kLimit : x;
  xc = xc > kLimit ? kLimit : xc;
  const float k = (xc * kLog2e + kRound) - kRound;
  float r = xc - k * kLn2Hi;
  r = r - k * kLn2Lo;
  const float r2 = r * r;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  poly = poly * r2 + r + 1.0f;
  // A biased exponent of 0 or below gives scale 0 (the result flushes to 0); 255 gives +inf.
  const int32_t biased = std::max(static_cast<int32_t>(k) + 127, 0);
  const uint32_t bits = static_cast<uint32_t>(biased) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = poly * scale;
  return (x != x) ? x : result;
}

inline double exp_vec(double x) {
  return std::exp(x);
}

// log for float in [1, 2] (all that softplus_vec needs; no special values):
// log(m * 2^e) = log(m) + e ln 2 with m in [sqrt(1/2), sqrt(2)) and Cephes'
// logf polynomial for log(m).
inline float log_1_to_2(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  bits = (bits & 0x007fffffu) | 0x3f800000u;
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1.0f : e;
  const float f = m - 1.0f;
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float r = f * f2 * p;
  r += e * -2.12194440e-4f;
  r += -0.5f * f2;
  return f + r + e * 0.693359375f;
}

// softplus(v) = max(v, 0) + log1p(exp(-|v|)), and v itself above 20 (torch's
// threshold). log1p(y) is computed as log(1 + y) * y / ((1 + y) - 1), which
// stays accurate for tiny y (Goldberg's trick), so a very negative v keeps its
// tiny positive softplus instead of rounding to 0.
inline float softplus_vec(float v) {
  const float y = exp_vec(-std::fabs(v));
  const float u = 1.0f + y;
  const float l = u == 1.0f ? y : log_1_to_2(u) * (y / (u - 1.0f));
  const float r = (v > 0.0f ? v : 0.0f) + l;
  return v > 20.0f ? v : r;
}

inline double softplus_vec(double v) {
  return v > 20.0 ? v : std::log1p(std::exp(v));
}

// silu and sigmoid without libm calls in the float path.
inline float sigmoid_vec(float v) {
  return 1.0f / (1.0f + exp_vec(-v));
}

inline double sigmoid_vec(double v) {
  return 1.0 / (1.0 + std::exp(-v));
}


}  // namespace lnlm_ssm
