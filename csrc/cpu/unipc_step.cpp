// CPU kernel of the fused UniPC step: OpenMP over (sample, tile) tasks, per-element math from
// fastdiff/unipc_math.h (shared with the CUDA kernel).
// No FP traps are ever enabled: let GCC if-convert the selects of predict_x0_eps, so the math
// loop vectorises (as csrc/cpu/sampler_step.cpp).
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <type_traits>

#include "fastdiff/common.h"
#include "fastdiff/cpu_isa.h"
#include "fastdiff/cpu_parallel.h"
#include "fastdiff/cpu_tiles.h"
#include "fastdiff/unipc_math.h"

namespace fastdiff {
namespace {

// Elements per tile. fp16 / bf16 operands are staged through fp32 buffers (up to nine of 4 KB,
// about L1's size), so the math loop is branch-free over plain floats (vectorised) and the dtype
// conversions run in their own loops; fp32 ones are used in place.
constexpr int64_t kTile = 1024;
alignas(64) const float kZeros[kTile] = {};  // an absent operand's tile

// The math loop of one tile, over staged fp32 operands (an absent one: zeros). Compiled twice:
// the portable baseline (SSE2 on x86-64) and, on x86-64 GCC/Clang, an AVX2+FMA clone picked at
// run time, where GCC contracts a * b + c into FMAs (as nvcc does on the GPU, and as the
// sampler_step CPU kernel's clone does): 8 lanes and half the arithmetic (the baseline was ~5x
// slower per element than sampler_step's clone at (8, 4, 64, 64)). The clones can differ in
// the last bit; one is chosen per process.
// Operands as __restrict parameters (GCC takes no-alias facts from parameters, not from locals).
#define FD_UNIPC_TILE_PARAMS                                                                    \
  const float *__restrict cf, int64_t len, int clip, float clip_r, const float *__restrict bx, \
      const float *__restrict bm, const float *__restrict bl, const float *__restrict b1,      \
      const float *__restrict b2, const float *__restrict b3, float *__restrict oc,            \
      float *__restrict om, float *__restrict on
#define FD_UNIPC_TILE_ARGS cf, len, clip, clip_r, bx, bm, bl, b1, b2, b3, oc, om, on

// MASK: a term whose coefficient is exactly 0 is absent (formed_operand); false is the plain loop.
// CLIP: clip (-1, the plain loop: GCC unswitches it) or fixed (0 / 1, the masked loop: the
// masks' extra instructions put it past GCC's unswitching limit, and the loop with the runtime
// clip select did not vectorise: 7x slower).
template <int PRED, bool O3, bool MASK, int CLIP>
inline __attribute__((always_inline)) void tile_loop(FD_UNIPC_TILE_PARAMS) {
  const int cl = CLIP < 0 ? clip : CLIP;
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    unipc_element<PRED, O3, MASK>(cf, bx[k], bm[k], cl, clip_r, 1, bl[k], 1, b1[k], 1, b2[k], 1,
                                  O3 ? b3[k] : 0.0f, oc[k], om[k], on[k]);
  }
}

template <int PRED, bool O3, bool MASK>
inline __attribute__((always_inline)) void tile_clip(FD_UNIPC_TILE_PARAMS) {
  if (!MASK) return tile_loop<PRED, O3, false, -1>(FD_UNIPC_TILE_ARGS);
  if (clip) return tile_loop<PRED, O3, MASK, 1>(FD_UNIPC_TILE_ARGS);
  return tile_loop<PRED, O3, MASK, 0>(FD_UNIPC_TILE_ARGS);
}

template <int PRED, bool O3, bool MASK>
void tile_base(FD_UNIPC_TILE_PARAMS) {
  tile_clip<PRED, O3, MASK>(FD_UNIPC_TILE_ARGS);
}

#if FD_X86_DISPATCH
template <int PRED, bool O3, bool MASK>
__attribute__((target("avx2,fma"))) void tile_avx2(FD_UNIPC_TILE_PARAMS) {
  tile_clip<PRED, O3, MASK>(FD_UNIPC_TILE_ARGS);
}
#endif

using UniPCTileFn = void (*)(FD_UNIPC_TILE_PARAMS);
#undef FD_UNIPC_TILE_PARAMS
#undef FD_UNIPC_TILE_ARGS

template <int PRED, bool O3, bool MASK>
UniPCTileFn pick_tile() {
#if FD_X86_DISPATCH
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return tile_avx2<PRED, O3, MASK>;
#endif
  return tile_base<PRED, O3, MASK>;
}

// O3: a row with order-3 terms (m_{i-3} present, or p_m2 != 0 with m_{i-2}); false (orders 1 and
// 2): the m_{i-3} buffer and both order-3 terms compile out, the loop is the order-2 one.
template <typename TX, typename TM, int PRED, bool O3>
void run(const UniPCArgs& A) {
  const float* c = reinterpret_cast<const float*>(A.coef);
  float coef[kUniPCCoefLen];
  for (int k = 0; k < kUniPCCoefLen; ++k) coef[k] = c[k];
  const int has_last = A.last != 0, has_m1 = A.m1 != 0, has_m2 = A.m2 != 0, has_m3 = A.m3 != 0;
  // An absent operand's term is skipped (the op's contract, as unipc_element's flags do): its
  // coefficients become 0 against the zero buffers below, so an inf / NaN coefficient there
  // cannot turn 0 * inf into NaN.
  if (!has_last) coef[3] = 0.0f;
  if (!has_m1) coef[5] = coef[9] = 0.0f;
  if (!has_m2) coef[6] = coef[11] = 0.0f;
  if (!has_m3) coef[10] = 0.0f;
  const float* cf = coef;
  // A term whose coefficient is exactly 0 is absent (formed_operand): the masked loop runs only
  // for a row where a formed term's coefficient is 0 (coef is host memory here; an absent
  // operand's zeroed coefficients above multiply kZeros and need no mask).
  const bool zero_coef = coef[2] == 0.0f || coef[4] == 0.0f || coef[7] == 0.0f ||
                         coef[8] == 0.0f || (has_last && coef[3] == 0.0f) ||
                         (has_m1 && (coef[5] == 0.0f || coef[9] == 0.0f)) ||
                         (has_m2 && coef[6] == 0.0f) || (O3 && has_m2 && coef[11] == 0.0f) ||
                         (O3 && has_m3 && coef[10] == 0.0f);
  static const auto tile_plain = pick_tile<PRED, O3, false>();
  static const auto tile_masked = pick_tile<PRED, O3, true>();
  const auto tile = zero_coef ? tile_masked : tile_plain;
  const int64_t tiles = (A.inner + kTile - 1) / kTile;
  // fp32 operands and outputs (the common case) are read and written in place; other dtypes
  // (and a guided output) are staged through fp32 tile buffers. Staging every operand cost more
  // than the math: nine 8 KB buffers per tile do not fit in L1.
  constexpr bool direct = std::is_same<TX, float>::value && std::is_same<TM, float>::value;
  parallel_tasks(A.n * tiles, kTile, [&](int64_t task) {
    const int64_t b = task / tiles, lo = (task % tiles) * kTile;
    const int64_t len = std::min(A.inner, lo + kTile) - lo;
    const TX* X = reinterpret_cast<const TX*>(A.x) + b * A.bs_x + lo;
    const TM* M = reinterpret_cast<const TM*>(A.m) + b * A.bs_m + lo;
    TX* XC = reinterpret_cast<TX*>(A.xc) + b * A.inner + lo;
    TX* X0 = reinterpret_cast<TX*>(A.x0) + b * A.inner + lo;
    TX* XN = reinterpret_cast<TX*>(A.xn) + b * A.inner + lo;
    // An absent operand reads zeros (never the caller's memory), so the math loop is
    // branch-free: with its coefficient zeroed above, adding the +0 term is skipping it.
    const auto operand = [&](uintptr_t base, int64_t bs, float* buf) -> const float* {
      if (base == 0) return kZeros;
      const TX* p = reinterpret_cast<const TX*>(base) + b * bs + lo;
      if constexpr (direct) {
        return reinterpret_cast<const float*>(p);
      } else {
        load_f32(p, len, buf);
        return buf;
      }
    };
    alignas(64) float bx[direct ? 1 : kTile], bl[direct ? 1 : kTile], b1[direct ? 1 : kTile];
    alignas(64) float b2[direct ? 1 : kTile], b3[(direct || !O3) ? 1 : kTile];
    alignas(64) float bm[kTile];  // the model output (staged when guided or not fp32)
    alignas(64) float oc[direct ? 1 : kTile], om[direct ? 1 : kTile], on[direct ? 1 : kTile];
    const float* px = operand(A.x, A.bs_x, bx);
    const float* pm = bm;
    if (A.mu) {  // classifier-free guidance on the raw output halves (bm: the combined output)
      const TM* U = reinterpret_cast<const TM*>(A.mu) + b * A.bs_mu + lo;
      const float g = A.g;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k)
        bm[k] = cfg_combine(HostIO<TM>::load(M + k), HostIO<TM>::load(U + k), g);
    } else if constexpr (std::is_same<TM, float>::value) {
      pm = reinterpret_cast<const float*>(M);
    } else {
      load_f32(M, len, bm);
    }
    const float* pl = operand(A.last, A.bs_last, bl);
    const float* p1 = operand(A.m1, A.bs_m1, b1);
    const float* p2 = operand(A.m2, A.bs_m2, b2);
    const float* p3 = O3 ? operand(A.m3, A.bs_m3, b3) : kZeros;
    if constexpr (direct) {
      tile(cf, len, A.clip, A.clip_r, px, pm, pl, p1, p2, p3, reinterpret_cast<float*>(XC),
           reinterpret_cast<float*>(X0), reinterpret_cast<float*>(XN));
    } else {
      tile(cf, len, A.clip, A.clip_r, px, pm, pl, p1, p2, p3, oc, om, on);
      store_f32(XC, len, oc);
      store_f32(X0, len, om);
      store_f32(XN, len, on);
    }
  });
}

template <typename TX, typename TM, bool O3>
void run_pred(const UniPCArgs& A) {
  if (A.pred == kEpsilon) return run<TX, TM, kEpsilon, O3>(A);
  if (A.pred == kVPrediction) return run<TX, TM, kVPrediction, O3>(A);
  return run<TX, TM, kSample, O3>(A);
}

}  // namespace

void unipc_step_cpu(const UniPCArgs& A) {
  if (!check_unipc_args(A)) return;
  // coef is host memory here: a row without order-3 terms runs the order-2 loop (NaN != 0)
  const bool o3 = A.m3 != 0 || (A.m2 != 0 && reinterpret_cast<const float*>(A.coef)[11] != 0.0f);
  FASTDIFF_DISPATCH_HOST_DTYPES(A.dtype_x, A.dtype_m, "unipc_step", [&] {
    if (o3) {
      run_pred<TX, TM, true>(A);
    } else {
      run_pred<TX, TM, false>(A);
    }
  });
}

}  // namespace fastdiff
