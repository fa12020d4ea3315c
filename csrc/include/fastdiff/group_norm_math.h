// Per-element and per-group math of fused GroupNorm(+add, +scale/shift)+SiLU, shared by the CPU
// (csrc/cpu/group_norm.cpp) and CUDA (csrc/cuda/group_norm.cu) kernels so that the CPU build
// tests the arithmetic the GPU runs.
//
//   u = x + add[n,c]
//   y = act( (u - mean_g) * rstd_g * w[c] + bias[c]) * (1 + scale[n,c]) + shift[n,c] )
//     = act( a[n,c] * x + b[n,c] )                                  (one FMA per element)
//   a = rstd * w * (1 + scale)
//   b = (bias + (add - mean) * rstd * w) * (1 + scale) + shift
//
// Statistics are fp32/fp64 "shifted sums": for a shift K taken from the data itself,
// s1 = sum(x - K), s2 = sum((x - K)^2), so mean = K + s1/m and M2 = s2 - s1^2/m do not cancel
// catastrophically (K lies inside the data's range). A constant group gives s1 = s2 = 0 exactly.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastdiff/common.h"

// FD_HD, forced inline on the host so GCC's vectoriser sees straight-line code in hot loops.
#if defined(__CUDACC__)
#define FD_GN FD_HD
#else
#define FD_GN inline __attribute__((always_inline))
#endif

namespace fastdiff {
namespace gn {

FD_GN float as_float(int32_t i) { return fd_bits_float((uint32_t)i); }

FD_GN int32_t as_int(float f) { return (int32_t)fd_float_bits(f); }

// min(max(x, lo), hi) with NaN passing through, as bit masks: GCC refuses to if-convert
// (and so to vectorise) loops holding two float ternaries plus further arithmetic.
FD_GN float clamp_keep_nan(float x, float lo, float hi) {
  int32_t b = as_int(x);
  const int32_t mh = -(int32_t)(x > hi);
  const int32_t ml = -(int32_t)(x < lo);
  b = (b & ~mh) | (as_int(hi) & mh);
  b = (b & ~ml) | (as_int(lo) & ml);
  return as_float(b);
}

// exp(x) in fp32 without branches or libm calls, so that GCC vectorises loops using it.
// Cephes expf: n = round(x log2 e) by the 1.5*2^23 magic-add trick (its low mantissa bits are n),
// r = x - n ln2 (two-part ln2), e^r by a degree-6 minimax polynomial, times 2^n assembled in the
// exponent field. Max error ~1 ulp on [-87, 88]; inputs are clamped there (e^-87 = 1.6e-38 is
// the smallest normal result). NaN propagates (the clamps compare false for NaN).
FD_GN float exp_poly(float x) {
  x = clamp_keep_nan(x, -87.0f, 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23
  float t = x * 1.44269504088896341f + magic;
  float n = t - magic;
  // n's low bits; unsigned so that NaN (a garbage n) shifts without undefined behaviour
  const uint32_t ni = fd_float_bits(t) - 0x4B400000u;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  return p * fd_bits_float((ni + 127u) << 23);
}

// SiLU(v) = v * sigmoid(v) = v / (1 + e^-v) in fp32 (Elfwing et al. 2018). Below v = -88,
// e^-v overflows fp32 and the result is v * 0 (-0, or NaN for v = -inf, as PyTorch gives); the
// host's exp_poly clamps its argument, so that case is selected explicitly (as bit masks, which
// keeps the loops vectorisable).
FD_GN float silu(float v) {
#if defined(__CUDA_ARCH__)
  return v / (1.0f + __expf(-v));
#else
  const float y = v / (1.0f + exp_poly(-v));
  const int32_t under = -(int32_t)(v < -88.0f);
  return as_float((as_int(y) & ~under) | (as_int(v * 0.0f) & under));
#endif
}

FD_GN float apply(float x, float a, float b) { return x * a + b; }

FD_GN float apply_act(float x, float a, float b, bool use_silu) {
  float v = x * a + b;
  return use_silu ? silu(v) : v;
}

// 1/sqrt(var + eps); 0 for a group whose every element equals the mean (var == 0 exactly), which
// makes a == 0 and the output exactly act(bias * (1 + scale) + shift), with no NaN.
FD_GN float rstd_from(float var, float eps) {
  if (var == 0.0f) return 0.0f;
#if defined(__CUDA_ARCH__)
  return rsqrtf(var + eps);
#else
  return 1.0f / std::sqrt(var + eps);
#endif
}

// Fold group statistics and per-(n, c) parameters into y = act(a * x + b).
// mean is the group mean of u = x + add; add/scale/shift/w/bias default to 0/0/0/1/0.
FD_GN void fold(float mean, float rstd, float w, float bias, float add, float scale, float shift,
                float* a, float* b) {
  float s1 = 1.0f + scale;
  float ws = rstd * w;
  *a = ws * s1;
  *b = ((add - mean) * ws + bias) * s1 + shift;
}

// max(v, 0) for a rounding-negative sum of squares, with NaN passing through: an inf in a group
// makes its M2 inf - inf = NaN, and `v > 0 ? v : 0` would turn that into 0 (a finite rstd, then
// (x - inf) * rstd = -inf where the reference has NaN).
template <typename Acc>
FD_GN Acc nonneg(Acc v) {
  return v < Acc(0) ? Acc(0) : v;
}

// Shifted sums (relative to shift k) over `count` elements -> (mean, M2).
template <typename Acc>
FD_GN void shifted_to_moments(Acc k, Acc s1, Acc s2, Acc count, Acc* mean, Acc* m2) {
  Acc d = s1 / count;
  *mean = k + d;
  *m2 = nonneg(s2 - s1 * d);
}

}  // namespace gn

// Arguments of the fused op across the raw-pointer ABI. x/y: [N x C x HW] (nhwc = false) or
// [N x HW x C] (nhwc = true) of `dtype`; weight/bias: [C] fp32 or null; add/scale/shift:
// [N x C] fp32 or null.
struct GroupNormArgs {
  uintptr_t x, y;
  int64_t N, C, HW, G;
  bool nhwc;
  int dtype;
  uintptr_t weight, bias, add, scale, shift;
  float eps;
  bool silu;
  // CUDA only. Operand storage: dtype codes of weight/bias and of add/scale/shift (fp32, fp16 or
  // bf16, converted to fp32 on load) and the row strides (elements) of add/scale/shift, so an
  // fp16 model's parameters and chunk()/expand() views need no cast or copy kernels. The CPU
  // kernel takes fp32 contiguous operands (the defaults).
  int wb_dtype = 0, cond_dtype = 0;
  int64_t add_rs = -1, scale_rs = -1, shift_rs = -1;  // -1: C
  // CUDA only: fp32 scratch of group_norm_silu_cuda_workspace(args) floats (0 when none needed).
  uintptr_t workspace = 0;
  int64_t workspace_floats = 0;
};

// csrc/cpu/group_norm.cpp
void group_norm_silu_cpu(const GroupNormArgs& a);

}  // namespace fastdiff
