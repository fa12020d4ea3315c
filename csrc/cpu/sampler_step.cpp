// CPU kernel of the fused sampler update: OpenMP over (sample, tile) pairs, each tile staged
// through fp32 buffers in L1 so the math and Philox loops vectorise (omp simd).
// No FP traps are ever enabled: let GCC if-convert the selects in the tile loops (vectorise).
// Pre-register-allocation scheduling (register-pressure aware; off by default on x86): the
// pipelined Philox + Box-Muller loop spills less (316 vs 356 stack accesses in
// gen_normals_avx2); same instructions' results (outputs bit-identical). Measured at 1 thread:
// eta1 step min unchanged (~100-107 us), paired median per round 0.1-6 us faster under load.
#pragma GCC optimize("no-trapping-math", "schedule-insns", "sched-pressure")
#include <algorithm>
#include <cstring>

#include "fastdiff/cpu_isa.h"
#if FD_X86_DISPATCH
#include <immintrin.h>
#endif

#include "fastdiff/cpu_tiles.h"
#include "fastdiff/philox.h"
#include "fastdiff/sampler_math.h"
#include "sampler_step_normals.h"

namespace fastdiff {
namespace {

// Elements per tile: 2048 (vs 1024, vs 512) halves the per-tile setup of the pipelined noise
// generator (keys, the first group's unoverlapped Philox): eta1 step ~5% faster at 1024, another
// 1-3% (paired per-round medians) at 2048; ~75 KB of stack buffers.
constexpr int64_t kTile = 2048;
constexpr int64_t kGrain = int64_t(1) << 15;  // work units per parallel region (see run())

// out[4k + j] = pj[k] for k < len.
void interleave4(float* __restrict out, const float* __restrict p0, const float* __restrict p1,
                 const float* __restrict p2, const float* __restrict p3, int64_t len) {
  for (int64_t k = 0; k < len; ++k) {
    out[4 * k] = p0[k];
    out[4 * k + 1] = p1[k];
    out[4 * k + 2] = p2[k];
    out[4 * k + 3] = p3[k];
  }
}

constexpr int64_t kGroups = kTile / 4 + 4;  // counters per tile (+ partial groups at both ends)

// dst[0, len) = noise of logical elements [e0, e0 + len): element e is lane e % 4 of counter
// offset + e / 4 (len <= kTile + 8).
void normals_range(float* dst, uint64_t e0, int64_t len, uint64_t offset, uint32_t key0,
                   uint32_t key1) {
  alignas(64) float buf[4 * kGroups];
  const int64_t r = (int64_t)(e0 & 3u);
  const int64_t ng = (r + len + 3) >> 2;
  const uint64_t c0 = offset + (e0 >> 2);
  const bool whole = r == 0 && (len & 3) == 0;  // whole counters: straight into dst
  float* out = whole ? dst : buf;
#ifdef FD_HAVE_AVX2_PHILOX
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    gen_normals_avx2(out, c0, ng, key0, key1);
    if (!whole) std::memcpy(dst, buf + r, (size_t)len * sizeof(float));
    return;
  }
#endif
  alignas(64) uint32_t clo[kGroups], chi[kGroups];
  alignas(64) float p0[kGroups], p1[kGroups], p2[kGroups], p3[kGroups];
  const uint32_t blo = (uint32_t)c0, bhi = (uint32_t)(c0 >> 32);
#pragma omp simd
  for (int64_t k = 0; k < ng; ++k) {  // c0 + k in 32-bit halves (carry into hi when lo wraps)
    const uint32_t l = blo + (uint32_t)k;
    clo[k] = l;
    chi[k] = bhi + (l < blo ? 1u : 0u);
  }
  fill_normals4_base(p0, p1, p2, p3, clo, chi, ng, key0, key1);
  interleave4(out, p0, p1, p2, p3, ng);
  if (!whole) std::memcpy(dst, buf + r, (size_t)len * sizeof(float));
}

// The elementwise math of one tile (fp32 buffers). PRED, the eps recomputation and the x0 store
// are template arguments so each loop is straight-line with no dead work (GCC if-converts the
// eps recomputation into a select it evaluates for every element otherwise); the other runtime
// options are loop invariant (GCC unswitches them) and copied to locals so no store to ob/x0b
// can alias them. MASK: a term whose coefficient is exactly 0 is absent (formed_operand); false
// is the plain loop, run when every formed term's coefficient is non-zero. CLIP: opt.clip (-1,
// the plain loops: GCC unswitches it) or fixed (0 / 1, the masked loops: the masks' extra
// instructions put them past GCC's unswitching limit, and the loop with the runtime clip select
// did not vectorise: 6x slower).
template <int PRED, bool RECOMP, bool X0, bool MASK, int CLIP>
inline __attribute__((always_inline)) void tile_math_t(
    const StepOptions& opt, const float* cf, int64_t len, const float* __restrict xb,
    const float* __restrict mb, const float* __restrict up, const float* __restrict sp,
    const float* __restrict zp, const float* __restrict qp, const float* __restrict q3p,
    const float* __restrict q4p, float* __restrict ob, float* __restrict x0b) {
  const int mode = opt.mode, cfg = opt.cfg, clip = CLIP < 0 ? opt.clip : CLIP;
  const int lv = opt.learned_var, has_z = opt.has_z;
  const float g = opt.g, clip_r = opt.clip_r;
  const float a = cf[0], s = cf[1], k2 = cf[2], k3 = cf[3], k4 = cf[4], k5 = cf[5];
  if (mode == 0) {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      // unconditional loads (every pointer is valid) keep the loop free of control flow
      const float uv = up[j], sv = sp[j], zv = zp[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, RECOMP, true, x0, eps);
      const float sigma = lv ? sv : k5;
      ob[j] = sampler_update<MASK>(k2, k3, k4, xb[j], x0, eps, has_z, sigma, zv);
      if (X0) x0b[j] = x0;
    }
  } else if (MASK && opt.has_prev3) {  // x0_prev3 (x0_prev4): masked loops only, one loop
    // every operand is read (an absent one is another valid tile); an absent term's coefficient
    // is 0 here (the launcher zeroes cf[9] without x0_prev4), so it is not formed. Term order:
    // x, x0, x0_prev, x0_prev2, x0_prev3, x0_prev4, noise, eps (the torch reference's).
    const float k4e = opt.has_z ? k4 : 0.0f, k5e = opt.has_noise ? k5 : 0.0f;
    const float k6 = cf[6], k7 = cf[7], k8 = cf[8], k9 = cf[9];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float uv = up[j], zv = zp[j], wv = sp[j], qv = qp[j], q3v = q3p[j], q4v = q4p[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 1, true, x0, eps);
      const float v = dpm_hist_update<true>(k2, k3, k4e, k6, k8, k9, xb[j], x0, zv, qv, q3v, q4v,
                                            k5e, wv);
      ob[j] = with_eps_term<true>(v, k7, eps);
      if (X0) x0b[j] = x0;
    }
  } else if (MASK && opt.has_eps) {  // dpm with the eps term (c_eps != 0): masked loops only
    // straight-line loops (runtime selects between the updates did not vectorise: 7x slower):
    // an absent operand's coefficient is 0 here, so its term is not formed (formed_operand: a
    // loop-invariant bit mask); the terms add in the order of the other loops (x, x0, x0_prev,
    // x0_prev2, noise), then eps
    const float k4e = opt.has_z ? k4 : 0.0f, k6e = opt.has_prev2 ? cf[6] : 0.0f;
    const float k5e = opt.has_noise ? k5 : 0.0f, k7 = cf[7];
    if (!opt.has_prev2 && !opt.has_noise) {  // Heun's / DPM2's second stage: 3 operands read
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float uv = up[j], zv = zp[j];
        const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
        float x0, eps;
        predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 1, true, x0, eps);
        const float v = dpm2m_update<true>(k2, k3, k4e, xb[j], x0, 1, zv);
        ob[j] = with_eps_term<true>(v, k7, eps);
        if (X0) x0b[j] = x0;
      }
      return;
    }
    if (!opt.has_prev2) {  // DPM2 a's second stage: with the noise
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float uv = up[j], zv = zp[j], wv = sp[j];
        const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
        float x0, eps;
        predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 1, true, x0, eps);
        const float v = dpm2m_sde_update<true>(k2, k3, k4e, xb[j], x0, 1, zv, k5e, wv);
        ob[j] = with_eps_term<true>(v, k7, eps);
        if (X0) x0b[j] = x0;
      }
      return;
    }
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float uv = up[j], zv = zp[j], wv = sp[j], qv = qp[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 1, true, x0, eps);
      const float v = dpm3m_update<true>(k2, k3, k4e, k6e, xb[j], x0, zv, qv, 1, k5e, wv);
      ob[j] = with_eps_term<true>(v, k7, eps);
      if (X0) x0b[j] = x0;
    }
  } else if (opt.has_prev2) {  // 3M (ODE or SDE): qp is x0_prev2, sp the noise tile if any
    const int has_noise = opt.has_noise;
    const float k6 = cf[6];
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float uv = up[j], zv = zp[j], wv = sp[j], qv = qp[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 0, false, x0, eps);
      ob[j] = dpm3m_update<MASK>(k2, k3, k4, k6, xb[j], x0, zv, qv, has_noise, k5, wv);
      if (X0) x0b[j] = x0;
    }
  } else if (opt.has_noise) {  // SDE variant: sp is the noise tile here (no variance in dpm)
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float uv = up[j], zv = zp[j], wv = sp[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 0, false, x0, eps);
      ob[j] = dpm2m_sde_update<MASK>(k2, k3, k4, xb[j], x0, has_z, zv, k5, wv);
      if (X0) x0b[j] = x0;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float uv = up[j], zv = zp[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 0, false, x0, eps);
      ob[j] = dpm2m_update<MASK>(k2, k3, k4, xb[j], x0, has_z, zv);
      if (X0) x0b[j] = x0;
    }
  }
}

// The parameters of the dispatch layers below tile_math_t (each forwards them unchanged).
#define FD_TILE_PARAMS                                                                       \
  int pred, const StepOptions &opt, const float *cf, int64_t len, const float *xb,           \
      const float *mb, const float *up, const float *sp, const float *zp, const float *qp, \
      const float *q3p, const float *q4p, float *ob, float *x0b
#define FD_TILE_ARGS pred, opt, cf, len, xb, mb, up, sp, zp, qp, q3p, q4p, ob, x0b
#define FD_TILE_MATH_ARGS opt, cf, len, xb, mb, up, sp, zp, qp, q3p, q4p, ob, x0b

template <bool RECOMP, bool X0, bool MASK, int CLIP>
inline __attribute__((always_inline)) void tile_math_p(FD_TILE_PARAMS) {
  switch (pred) {
    case kEpsilon: return tile_math_t<kEpsilon, RECOMP, X0, MASK, CLIP>(FD_TILE_MATH_ARGS);
    case kVPrediction: return tile_math_t<kVPrediction, RECOMP, X0, MASK, CLIP>(FD_TILE_MATH_ARGS);
    default: return tile_math_t<kSample, RECOMP, X0, MASK, CLIP>(FD_TILE_MATH_ARGS);
  }
}

// MASK false: the plain loops (opt.clip at run time, GCC unswitches it); true: the masked loops,
// with the clip fixed at compile time (see tile_math_t).
template <bool RECOMP, bool X0, bool MASK>
inline __attribute__((always_inline)) void tile_math_c(FD_TILE_PARAMS) {
  if (!MASK) return tile_math_p<RECOMP, X0, false, -1>(FD_TILE_ARGS);
  if (opt.clip) return tile_math_p<RECOMP, X0, true, 1>(FD_TILE_ARGS);
  return tile_math_p<RECOMP, X0, true, 0>(FD_TILE_ARGS);
}

// x0 is stored only when asked for (x0b == nullptr otherwise).
#define FD_TILE_MATH_BODY                                                  \
  const bool rc = opt.recompute != 0 && opt.clip != 0;                     \
  if (x0b != nullptr) {                                                    \
    if (rc) return tile_math_c<true, true, MASK>(FD_TILE_ARGS);            \
    return tile_math_c<false, true, MASK>(FD_TILE_ARGS);                   \
  }                                                                        \
  if (rc) return tile_math_c<true, false, MASK>(FD_TILE_ARGS);             \
  return tile_math_c<false, false, MASK>(FD_TILE_ARGS);

using TileMathFn = void (*)(FD_TILE_PARAMS);

// One function per MASK: the masked loops are separate code, so the plain function is the same
// size as before them (in one function, the plain DDIM loop lost ~50%: GCC's per-function
// budgets).
template <bool MASK>
void tile_math_base(FD_TILE_PARAMS) {
  FD_TILE_MATH_BODY
}

// AVX2+FMA clone: GCC contracts a * b + c into FMAs here (C++ default -ffp-contract=fast, as
// nvcc does on the GPU), which halves the arithmetic of the loop (it bounded the step in cache);
// the baseline (SSE2) clone rounds each product separately, so the two clones can differ in the
// last bit. Chosen once per process, so results are reproducible on one machine.
#if FD_X86_DISPATCH
template <bool MASK>
__attribute__((target("avx2,fma"))) void tile_math_avx2(FD_TILE_PARAMS) {
  FD_TILE_MATH_BODY
}
#endif
#undef FD_TILE_MATH_BODY
#undef FD_TILE_MATH_ARGS
#undef FD_TILE_ARGS
#undef FD_TILE_PARAMS

template <bool MASK>
TileMathFn pick_tile_math() {
#if FD_X86_DISPATCH
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return tile_math_avx2<MASK>;
#endif
  return tile_math_base<MASK>;
}

// dst[0, len) = the Philox noise of sample n's memory elements [i0, i0 + len): element e
// (logical NCHW index) is lane e % 4 of counter offset + e / 4.
void philox_tile(float* dst, const StepArgs& A, int64_t n, int64_t M, int64_t i0, int64_t len,
                 const PhiloxState& rng) {
  const uint64_t offset = rng.offset;
  const uint32_t key0 = rng.key0, key1 = rng.key1;
  const uint64_t base = (uint64_t)(n * M);  // logical index of the sample's first element
  if (A.nhwc_c > 0) {
    // memory index i = hw * C + c <-> logical c * HW + hw: one logical run per channel
    const int64_t C = A.nhwc_c, i1 = i0 + len - 1;
    const int64_t hw0 = i0 / C, c0 = i0 - hw0 * C, hw1 = i1 / C, c1 = i1 - hw1 * C;
    alignas(64) float run[kTile + 8];
    for (int64_t c = 0; c < C; ++c) {
      const int64_t first = hw0 + (c < c0 ? 1 : 0), last = hw1 - (c > c1 ? 1 : 0);
      if (last < first) continue;
      normals_range(run, base + (uint64_t)(c * A.hw + first), last - first + 1, offset, key0,
                    key1);
      for (int64_t h = first; h <= last; ++h) dst[h * C + c - i0] = run[h - first];
    }
  } else {
    normals_range(dst, base + (uint64_t)i0, len, offset, key0, key1);
  }
}

template <typename TX, typename TM, int PRED>
void run(const StepArgs& A) {
  StepOptions o = A.opt;
  const float* cp = reinterpret_cast<const float*>(A.coef);
  // coef[8] / coef[9] exist (are read) only with x0_prev3 / x0_prev4; 0 otherwise
  float coefs[10] = {};
  const int ncoef = o.has_prev4 ? 10 : (o.has_prev3 ? 9 : 8);
  for (int k = 0; k < ncoef; ++k) coefs[k] = cp[k];
  const float k2 = coefs[2], k3 = coefs[3], k4 = coefs[4];
  const float k5 = coefs[5], k6 = coefs[6], k7 = coefs[7];
  // A term whose coefficient is exactly 0 is absent (formed_operand); the coefficients are host
  // memory here, so the masked loops run only for a step where a formed term's coefficient is 0
  // (DDIM's c_x, DDPM's c_eps, LCM's c_eps after clip_sample); a learned variance's per-element
  // sigma is checked per tile below.
  // dpm: the eps term (coef[7]) is formed only when its coefficient is non-zero
  o.has_eps = o.mode == 1 && k7 != 0.0f;
  const bool lv = o.learned_var != 0;
  const bool zero_coef =
      o.mode == 0 ? (k2 == 0.0f || k3 == 0.0f || k4 == 0.0f || (o.has_z && !lv && k5 == 0.0f))
                  : (k2 == 0.0f || k3 == 0.0f || (o.has_z && k4 == 0.0f) ||
                     (o.has_prev2 && k6 == 0.0f) || (o.has_noise && k5 == 0.0f));
  const PhiloxState rng = philox_state(A.gen);
  const StepOperands<TX, TM> P(A);
  const int64_t M = A.inner;
  const int64_t tiles = (M + kTile - 1) / kTile;
  const int64_t total = A.n * tiles;
  const bool philox = A.gen != 0;
  static const TileMathFn tile_plain = pick_tile_math<false>();
  static const TileMathFn tile_masked = pick_tile_math<true>();
  // Fork threads from ~32k element-units of work, torch's own grain (at::internal::GRAIN_SIZE;
  // a Philox element counts 5 units): the eager steps this replaces fork at the same size. On an
  // oversubscribed machine a parallel region can cost a scheduler tick; there,
  // OMP_NUM_THREADS=1 turns threading off.
  const bool parallel = total > 1 && A.n * M * (philox ? 5 : 1) >= kGrain;
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t n = t / tiles;
    const int64_t i0 = (t - n * tiles) * kTile;
    const int64_t len = std::min(kTile, M - i0);
    alignas(64) float xb[kTile], mb[kTile], ub[kTile], vb[kTile], zb[kTile], ob[kTile], x0b[kTile];
    alignas(64) float qb[kTile], q3b[kTile], q4b[kTile];
    const float* xp = as_f32(P.x + n * A.bs_x + i0, len, xb);
    const float* mp = as_f32(P.m + n * A.bs_m + i0, len, mb);
    const float* up = mp;
    const float* sp = mp;
    const float* zp = mp;
    if (o.cfg) up = as_f32(P.mu + n * A.bs_mu + i0, len, ub);
    // the eps and x0_prev3 loops are in the masked function only
    bool mask = zero_coef || o.has_eps || o.has_prev3;
    if (lv) {  // sigma per element (expf: its own loop so the main loop vectorises)
      load_f32(P.v + n * A.bs_v + i0, len, vb);
      bool zero_sigma = false;
      for (int64_t j = 0; j < len; ++j) {
        vb[j] = learned_sigma(k5, vb[j], k6, k7);
        zero_sigma |= vb[j] == 0.0f;
      }
      mask = mask || (o.has_z && zero_sigma);
      sp = vb;
    }
    if (P.z) {
      zp = as_f32(P.z + n * A.bs_z + i0, len, zb);
    } else if (philox && o.mode == 0) {
      philox_tile(zb, A, n, M, i0, len, rng);
      zp = zb;
    }
    if (o.mode == 1 && o.has_noise) {  // the SDE noise goes in the (unused) variance slot
      if (P.w) {
        sp = as_f32(P.w + n * A.bs_w + i0, len, vb);
      } else {
        philox_tile(vb, A, n, M, i0, len, rng);
        sp = vb;
      }
    }
    const float* qp = mp;
    if (P.q) qp = as_f32(P.q + n * A.bs_q + i0, len, qb);  // 3M: x0_prev2
    const float* q3p = P.q3 ? as_f32(P.q3 + n * A.bs_q3 + i0, len, q3b) : mp;
    const float* q4p = P.q4 ? as_f32(P.q4 + n * A.bs_q4 + i0, len, q4b) : mp;
    // fp32 outputs are written in place; other dtypes go through the fp32 tiles
    float* op = out_f32(P.out + n * M + i0, ob);
    float* x0p = P.x0 ? out_f32(P.x0 + n * M + i0, x0b) : nullptr;
    (mask ? tile_masked : tile_plain)(PRED, o, coefs, len, xp, mp, up, sp, zp, qp, q3p, q4p, op,
                                      x0p);
    flush_f32(P.out + n * M + i0, ob, len);
    if (P.x0) flush_f32(P.x0 + n * M + i0, x0b, len);
  }
}

template <typename TX, typename TM>
void run_pred(const StepArgs& A) {
  switch (A.opt.pred) {
    case kEpsilon: return run<TX, TM, kEpsilon>(A);
    case kVPrediction: return run<TX, TM, kVPrediction>(A);
    default: return run<TX, TM, kSample>(A);  // check_step_args: 0, 1 or 2
  }
}

}  // namespace

void sampler_step_cpu(const StepArgs& A) {
  if (!check_step_args(A)) return;
  FASTDIFF_DISPATCH_HOST_DTYPES(A.dtype_x, A.dtype_m, "sampler_step", [&] { run_pred<TX, TM>(A); });
}

}  // namespace fastdiff
