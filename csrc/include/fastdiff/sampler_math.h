// Per-element math of the fused sampler update, shared by csrc/cpu/sampler_step.cpp and
// csrc/cuda/sampler_step.cu (FD_HD), so the CPU build tests the arithmetic the GPU runs.
// All math in fp32. NaN in -> NaN out: the clamp propagates NaN, and the only thing selected
// away is the operand of a term whose coefficient is exactly 0 (formed_operand): the sampler's
// math has no such term.
#pragma once

#include <cmath>

#include "fastdiff/common.h"

namespace fastdiff {

enum Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// Runtime options of one step (identical for every element).
struct StepOptions {
  int mode;          // 0: sampler_step, 1: dpm_solver_2m_step
  int pred;          // Prediction
  int clip;          // clamp x0 to [-clip_r, clip_r]
  float clip_r;
  int recompute;     // eps = (x - a x0) / s after clipping
  int cfg;           // m = u + g (c - u)
  float g;
  int learned_var;   // sigma from the variance values v
  int has_z;         // noise tensor or in-kernel Philox (sampler_step); x0_prev (dpm)
  int has_noise;     // dpm only: noise w (tensor or in-kernel Philox), the SDE variant's term
  int has_prev2;     // dpm only: x0_prev2 q (3M; requires x0_prev)
  int has_prev3;     // dpm only: x0_prev3 q3 (coef[8]; requires x0_prev2)
  int has_prev4;     // dpm only: x0_prev4 q4 (coef[9]; requires x0_prev3)
  int has_eps;       // dpm only, CPU loops: coef[7] = c_eps != 0 (set by the CPU launcher)
};

// clamp that returns NaN for NaN input (comparisons with NaN are false).
FD_HD_INLINE float nan_clamp(float v, float lo, float hi) {
  v = v < lo ? lo : v;  // two flat selects (if-convertible, so CPU loops vectorise)
  return v > hi ? hi : v;
}

// The operand v of a term c * v as the update sees it. kMaskZeroCoef false: v itself (the CPU
// loops' common case, today's arithmetic). true: 0 when the coefficient c is exactly 0, so such a
// term is absent whatever v is (no 0 * inf = NaN where the sampler's math has no term: LCM's eps
// after clip_sample, PNDM's warm-up rows, DDIM's x), else v, so a formed term still propagates
// inf / NaN. CUDA always masks (free there); the CPU launchers pick the masked loops only when a
// formed term's coefficient is exactly 0 (their clip is a compile-time constant: with a runtime
// one the larger masked loops were not unswitched and did not vectorise). Two spellings, the
// same value (+0.0 or v), each the one GCC vectorises best where it is used (single-thread,
// AVX2): a bit mask, v's bits AND a loop-invariant all-ones / zero word (DPM, UniPC: with a
// select the 3M loop did not vectorise), and a select (sampler_update: the bit mask cost the
// clipped DDIM loop +30%, the select nothing).
template <bool kMaskZeroCoef>
FD_HD_INLINE float formed_operand(float c, float v) {
  if (!kMaskZeroCoef) return v;
  return fd_bits_float(fd_float_bits(v) & (c == 0.0f ? 0u : 0xffffffffu));
}
template <bool kMaskZeroCoef>
FD_HD_INLINE float formed_operand_sel(float c, float v) {
  if (!kMaskZeroCoef) return v;
  return c == 0.0f ? 0.0f : v;
}

// Classifier-free guidance on the raw model output halves.
FD_HD_INLINE float cfg_combine(float cond, float uncond, float g) { return uncond + g * (cond - uncond); }

// x0 and eps from the model output m (DDIM eq. 9; v-parameterisation, Salimans & Ho 2022).
template <int PRED>
FD_HD_INLINE void predict_x0_eps(float x, float m, float a, float s, int clip, float clip_r,
                          int recompute, bool need_eps, float& x0, float& eps) {
  // True quotients, not products with 1/a: at the first step of a sampler a is ~0.006, and the
  // reciprocal's extra rounding took the fused x0 past 2x eager's error (tests/test_unipc.py).
  if (PRED == kEpsilon) {
    eps = m;
    x0 = (x - s * eps) / a;
  } else if (PRED == kVPrediction) {
    x0 = a * x - s * m;
    eps = a * m + s * x;
  } else {
    x0 = m;
    eps = 0.0f;
    if (need_eps) eps = (x - a * x0) / s;
  }
  // a select rather than a branch so that the CPU loops if-convert and vectorise; the eps
  // recomputation is under a loop-invariant condition (CPU loops are unswitched on it)
  x0 = clip ? nan_clamp(x0, -clip_r, clip_r) : x0;
  if (need_eps && clip && recompute) eps = (x - a * x0) / s;
}

// Improved DDPM learned range (Nichol & Dhariwal 2021, eq. 15): sigma = c_noise * exp(log var / 2).
FD_HD float learned_sigma(float c_noise, float v, float log_var_max, float log_var_min) {
  const float f = (v + 1.0f) * 0.5f;
  return c_noise * expf(0.5f * (f * log_var_max + (1.0f - f) * log_var_min));
}

// x_prev = c_x0 x0 + c_eps eps + c_x x (+ sigma z); kMask: a term whose coefficient is exactly
// 0 is absent (formed_operand).
template <bool kMask>
FD_HD float sampler_update(float c_x0, float c_eps, float c_x, float x, float x0, float eps,
                           int has_z, float sigma, float z) {
  const float mean = c_x0 * formed_operand_sel<kMask>(c_x0, x0) +
                     c_eps * formed_operand_sel<kMask>(c_eps, eps) +
                     c_x * formed_operand_sel<kMask>(c_x, x);
  return has_z ? mean + sigma * formed_operand_sel<kMask>(sigma, z) : mean;
}

// DPM-Solver++ 2M: x_next = c_x x + c_x0 x0 (+ c_prev x0_prev; skipped, not zeroed, if absent).
// kMask: a term whose coefficient is exactly 0 is absent (formed_operand).
template <bool kMask>
FD_HD float dpm2m_update(float c_x, float c_x0, float c_prev, float x, float x0, int has_prev,
                         float x0_prev) {
  const float v = c_x * formed_operand<kMask>(c_x, x) + c_x0 * formed_operand<kMask>(c_x0, x0);
  return has_prev ? v + c_prev * formed_operand<kMask>(c_prev, x0_prev) : v;
}

// SDE-DPM-Solver++ 2M (Lu et al. 2022, arXiv:2211.01095, appendix: the SDE variant): the 2M
// update with its own c_x, c_x0, c_prev (folded by the sampler) plus c_noise z.
template <bool kMask>
FD_HD float dpm2m_sde_update(float c_x, float c_x0, float c_prev, float x, float x0, int has_prev,
                             float x0_prev, float c_noise, float z) {
  return dpm2m_update<kMask>(c_x, c_x0, c_prev, x, x0, has_prev, x0_prev) +
         c_noise * formed_operand<kMask>(c_noise, z);
}

// DPM-Solver++ 3M (diffusers' multistep_dpm_solver_third_order_update, "DPM++ 3M [SDE]"): the
// update is linear in x, x0, x0_prev, x0_prev2 and z, so the sampler folds the rest into the
// coefficients: x_next = c_x x + c_x0 x0 + c_prev x0_prev + c_prev2 x0_prev2 (+ c_noise z;
// skipped, not zeroed, without noise). Only called with both history operands present.
template <bool kMask>
FD_HD float dpm3m_update(float c_x, float c_x0, float c_prev, float c_prev2, float x, float x0,
                         float x0_prev, float x0_prev2, int has_noise, float c_noise, float z) {
  const float v = dpm2m_update<kMask>(c_x, c_x0, c_prev, x, x0, 1, x0_prev) +
                  c_prev2 * formed_operand<kMask>(c_prev2, x0_prev2);
  return has_noise ? v + c_noise * formed_operand<kMask>(c_noise, z) : v;
}

// The deeper-history step of dpm_solver_2m_step (x0_prev3, coef[8], and optionally x0_prev4,
// coef[9]): SA-Solver's predictor-corrector of orders 3-4 (Xue et al. 2023, eqs. 13-14, folded by
// the sampler into one linear map of x, m_i, ..., m_{i-4} and z) and the singlestep SDE-DPM-Solver++
// of order 3 (x0_prev3 = the group's anchor x_a). x_next = c_x x + c_x0 x0 + c_prev x0_prev +
// c_prev2 x0_prev2 + c_prev3 x0_prev3 + c_prev4 x0_prev4 (+ c_noise z), the terms added in this
// order. Only called masked with x0_prev, x0_prev2 and x0_prev3 present; an absent x0_prev4 is
// passed with c_prev4 = 0 (not formed), as an absent noise with c_noise = 0.
template <bool kMask>
FD_HD float dpm_hist_update(float c_x, float c_x0, float c_prev, float c_prev2, float c_prev3,
                            float c_prev4, float x, float x0, float x0_prev, float x0_prev2,
                            float x0_prev3, float x0_prev4, float c_noise, float z) {
  float v = dpm2m_update<kMask>(c_x, c_x0, c_prev, x, x0, 1, x0_prev) +
            c_prev2 * formed_operand<kMask>(c_prev2, x0_prev2);
  v += c_prev3 * formed_operand<kMask>(c_prev3, x0_prev3);
  v += c_prev4 * formed_operand<kMask>(c_prev4, x0_prev4);
  return v + c_noise * formed_operand<kMask>(c_noise, z);
}

// The eps term of dpm_solver_2m_step (coef[7] = c_eps), added last to any of the updates above:
// v + c_eps eps, eps the noise prediction of the (clipped) x0 (predict_x0_eps with recompute on),
// so a sampler can form a step from the model's eps as diffusers does (Heun's / DPM2's second
// stage: x_sigma + h d with d = (x_sigma - x0) / sigma = eps, no cancellation of x against x0).
// CUDA and Triton always add it (0 for c_eps = 0: formed_operand); the CPU launcher runs the loop
// with it only when c_eps != 0 (StepOptions::has_eps), the other loops are unchanged.
template <bool kMask>
FD_HD float with_eps_term(float v, float c_eps, float eps) {
  return v + c_eps * formed_operand<kMask>(c_eps, eps);
}

}  // namespace fastdiff

namespace fastdiff {

// The kernel ABI of sampler_step / dpm_solver_2m_step (CPU and CUDA). Every operand is a base
// address plus a per-sample (batch) stride in elements; each sample's block of `inner` elements
// is dense in x's memory order (NCHW row-major, or NHWC when nhwc_c > 0). Outputs are dense
// (batch stride = inner). Unused operands have address 0.
struct StepArgs {
  int64_t n = 0;       // samples
  int64_t inner = 0;   // elements per sample
  int64_t nhwc_c = 0;  // C when the per-sample order is HWC (channels_last), else 0
  int64_t hw = 0;      // H*W (used with nhwc_c to recover the logical NCHW index for Philox)
  uintptr_t x = 0, m = 0, mu = 0, v = 0, z = 0;  // x_t; model output (cond); uncond; variance;
  int64_t bs_x = 0, bs_m = 0, bs_mu = 0, bs_v = 0, bs_z = 0;  // noise (mode 0) / x0_prev (mode 1)
  uintptr_t w = 0;     // mode 1 only: noise z of the SDE variant (dtype_x), or 0
  int64_t bs_w = 0;
  uintptr_t q = 0;     // mode 1 only: x0_prev2 of the 3M step (dtype_x; needs z), or 0
  int64_t bs_q = 0;
  uintptr_t q3 = 0;    // mode 1 only: x0_prev3 (dtype_x; needs q; coef[8]), or 0
  int64_t bs_q3 = 0;
  uintptr_t q4 = 0;    // mode 1 only: x0_prev4 (dtype_x; needs q3; coef[9]), or 0
  int64_t bs_q4 = 0;
  uintptr_t gen = 0;   // int64[2] (seed, offset) for in-kernel Philox noise (either mode), or 0
  uintptr_t coef = 0;  // fp32[8] (9 with q3, 10 with q4)
  uintptr_t out = 0;   // x_prev / x_next, dtype_x
  uintptr_t x0 = 0;    // x0 output (dtype_x) or 0
  int dtype_x = 0;     // x, z, w, q, q3, q4, out, x0
  int dtype_m = 0;     // m, mu, v
  StepOptions opt{};
};

// StepArgs' operands as typed pointers (nullptr where absent): TX for x's dtype (x, x0_prev or
// noise z, w, q, q3, q4 and the outputs), TM for the model output's (m, mu, v).
template <typename TX, typename TM>
struct StepOperands {
  const TX* x;
  const TM *m, *mu, *v;
  const TX *z, *w, *q, *q3, *q4;
  TX *out, *x0;
  FD_HD explicit StepOperands(const StepArgs& A)
      : x(reinterpret_cast<const TX*>(A.x)), m(reinterpret_cast<const TM*>(A.m)),
        mu(reinterpret_cast<const TM*>(A.mu)), v(reinterpret_cast<const TM*>(A.v)),
        z(reinterpret_cast<const TX*>(A.z)), w(reinterpret_cast<const TX*>(A.w)),
        q(reinterpret_cast<const TX*>(A.q)), q3(reinterpret_cast<const TX*>(A.q3)),
        q4(reinterpret_cast<const TX*>(A.q4)), out(reinterpret_cast<TX*>(A.out)),
        x0(reinterpret_cast<TX*>(A.x0)) {}
};

// The boundary checks of both kernels (host side): std::invalid_argument (Python ValueError)
// naming what is missing; nothing is launched or written after one. Returns whether there is work
// (no samples or empty samples: nothing to do).
inline bool check_step_args(const StepArgs& A) {
  check_arg(A.n >= 0 && A.inner >= 0, "sampler_step: negative size");
  check_arg(A.x && A.m && A.coef && A.out, "sampler_step: null operand");
  check_arg(!A.opt.cfg || A.mu, "sampler_step: cfg needs the uncond operand");
  check_arg(!A.opt.learned_var || A.v, "sampler_step: learned_var needs the variance operand");
  check_arg(A.opt.pred >= 0 && A.opt.pred <= 2, "sampler_step: unknown prediction type");
  check_arg(!A.opt.has_noise || (A.opt.mode == 1 && (A.w || A.gen)),
            "sampler_step: has_noise needs mode 1 and a noise operand or generator state");
  check_arg(!A.opt.has_prev2 == !A.q && (!A.q || (A.opt.mode == 1 && A.z)),
            "sampler_step: x0_prev2 needs mode 1 and x0_prev");
  check_arg(!A.opt.has_prev3 == !A.q3 && (!A.q3 || A.q),
            "sampler_step: x0_prev3 needs x0_prev2 (mode 1, x0_prev)");
  check_arg(!A.opt.has_prev4 == !A.q4 && (!A.q4 || A.q3),
            "sampler_step: x0_prev4 needs x0_prev3");
  return A.n > 0 && A.inner > 0;
}

// csrc/cpu/sampler_step.cpp
void sampler_step_cpu(const StepArgs& args);

}  // namespace fastdiff
