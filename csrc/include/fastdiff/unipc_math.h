// Per-element math of the fused UniPC step (fastdiff/ops/unipc_step.py), shared by
// csrc/cpu/unipc_step.cpp and csrc/cuda/unipc_step.cu (FD_HD): the CPU twin tests the
// arithmetic the GPU runs. The x0 derivation is sampler_math.h's predict_x0_eps. All in fp32.
#pragma once

#include <cstdint>

#include "fastdiff/sampler_math.h"

namespace fastdiff {

// coef: [a, s, c_x, c_last, c_m, c_m1, c_m2, p_xc, p_m, p_m1, c_m3, p_m2] (the last two: order 3's
// corrector weight of m_{i-3} and predictor weight of m_{i-2})
constexpr int kUniPCCoefLen = 12;

// The kernel ABI: every operand a base address plus a per-sample stride in elements, each
// sample's `inner` elements dense in x's memory order; outputs dense (batch stride = inner).
// Absent operands (uncond without CFG, missing history) have address 0 and their terms are
// skipped, not multiplied by zero.
struct UniPCArgs {
  int64_t n = 0, inner = 0;
  uintptr_t x = 0, m = 0, mu = 0, last = 0, m1 = 0, m2 = 0, m3 = 0;
  int64_t bs_x = 0, bs_m = 0, bs_mu = 0, bs_last = 0, bs_m1 = 0, bs_m2 = 0, bs_m3 = 0;
  uintptr_t coef = 0;                 // fp32[12]
  uintptr_t xc = 0, x0 = 0, xn = 0;   // outputs, dtype_x
  int dtype_x = 0;                    // x, last, m1, m2, m3 and the outputs
  int dtype_m = 0;                    // m, mu
  int pred = 0, clip = 0, cfg = 0;
  float clip_r = 0.0f, g = 0.0f;
};

// One element: m = x0(x, model output);
// x_c = c_x x + c_last last + c_m m + c_m1 m1 + c_m2 m2 + c_m3 m3;
// x_next = p_xc x_c + p_m m + p_m1 m1 + p_m2 m2 (absent operands' terms skipped). O3 false: the
// order-3 terms (c_m3 m3, p_m2 m2) are not generated (a caller that knows p_m2 = 0 and no m3).
// kMask: a term whose coefficient is exactly 0 is absent too (formed_operand, sampler_math.h).
template <int PRED, bool O3, bool kMask>
FD_HD_INLINE void unipc_element(const float* c, float x, float mo, int clip, float clip_r, int has_last,
                                float last, int has_m1, float m1, int has_m2, float m2,
                                int has_m3, float m3, float& xc, float& m, float& xn) {
  float eps;
  predict_x0_eps<PRED>(x, mo, c[0], c[1], clip, clip_r, 0, false, m, eps);
  float v = c[2] * formed_operand<kMask>(c[2], x) + c[4] * formed_operand<kMask>(c[4], m);
  if (has_last) v += c[3] * formed_operand<kMask>(c[3], last);
  if (has_m1) v += c[5] * formed_operand<kMask>(c[5], m1);
  if (has_m2) v += c[6] * formed_operand<kMask>(c[6], m2);
  if (O3 && has_m3) v += c[10] * formed_operand<kMask>(c[10], m3);
  xc = v;
  float w = c[7] * formed_operand<kMask>(c[7], v) + c[8] * formed_operand<kMask>(c[8], m);
  if (has_m1) w += c[9] * formed_operand<kMask>(c[9], m1);
  if (O3 && has_m2) w += c[11] * formed_operand<kMask>(c[11], m2);
  xn = w;
}

// The boundary checks of both kernels (host side): std::invalid_argument (Python ValueError)
// naming the problem; nothing is launched or written after one. Returns whether there is work.
inline bool check_unipc_args(const UniPCArgs& A) {
  check_arg(A.n >= 0 && A.inner >= 0, "unipc_step: negative size");
  check_arg(A.pred >= 0 && A.pred <= 2, "unipc_step: prediction type code must be 0, 1 or 2");
  check_arg(A.cfg == (A.mu != 0), "unipc_step: cfg needs the uncond operand and only then");
  check_arg(A.m3 == 0 || (A.m2 != 0 && A.m1 != 0),
            "unipc_step: m_prev3 needs m_prev2 and m_prev");
  return A.n > 0 && A.inner > 0;
}

// csrc/cpu/unipc_step.cpp
void unipc_step_cpu(const UniPCArgs& args);

}  // namespace fastdiff
