// CPU kernel of the fused UniPC step: OpenMP over (sample, tile) tasks, per-element math from
// fastdiff/unipc_math.h (shared with the CUDA kernel).
// No FP traps are ever enabled: let GCC if-convert the selects of predict_x0_eps, so the math
// loop vectorises (as csrc/cpu/sampler_step.cpp).
#pragma GCC optimize("no-trapping-math")
#include <algorithm>

#include "fastdiff/common.h"
#include "fastdiff/cpu_parallel.h"
#include "fastdiff/unipc_math.h"

namespace fastdiff {
namespace {

// Elements per tile: each tile's operands are staged through fp32 buffers (~72 KB of stack), so
// the math loop is branch-free over plain floats (vectorised) and the dtype conversions run in
// their own loops.
constexpr int64_t kTile = 2048;

template <typename T>
inline void load_tile(const T* __restrict p, float* __restrict o, int64_t len) {
  for (int64_t k = 0; k < len; ++k) o[k] = HostIO<T>::load(p + k);
}

template <typename T>
inline void store_tile(T* __restrict p, const float* __restrict v, int64_t len) {
  for (int64_t k = 0; k < len; ++k) HostIO<T>::store(p + k, v[k]);
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
  const int64_t tiles = (A.inner + kTile - 1) / kTile;
  parallel_tasks(A.n * tiles, kTile, [&](int64_t task) {
    const int64_t b = task / tiles, lo = (task % tiles) * kTile;
    const int64_t len = std::min(A.inner, lo + kTile) - lo;
    float bx[kTile], bm[kTile], bl[kTile], b1[kTile], b2[kTile], oc[kTile], om[kTile], on[kTile];
    float b3[O3 ? kTile : 1];
    load_tile(reinterpret_cast<const TX*>(A.x) + b * A.bs_x + lo, bx, len);
    load_tile(reinterpret_cast<const TM*>(A.m) + b * A.bs_m + lo, bm, len);
    if (A.mu) {  // classifier-free guidance on the raw output halves (ou: the uncond half)
      float* ou = oc;  // scratch until the outputs are computed
      load_tile(reinterpret_cast<const TM*>(A.mu) + b * A.bs_mu + lo, ou, len);
      const float g = A.g;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) bm[k] = cfg_combine(bm[k], ou[k], g);
    }
    // An absent operand's staging buffer holds zeros (never the caller's memory), so the math
    // loop is branch-free: with its coefficient zeroed above, adding the +0 term is skipping it.
    if (has_last) {
      load_tile(reinterpret_cast<const TX*>(A.last) + b * A.bs_last + lo, bl, len);
    } else {
      std::fill(bl, bl + len, 0.0f);
    }
    if (has_m1) {
      load_tile(reinterpret_cast<const TX*>(A.m1) + b * A.bs_m1 + lo, b1, len);
    } else {
      std::fill(b1, b1 + len, 0.0f);
    }
    if (has_m2) {
      load_tile(reinterpret_cast<const TX*>(A.m2) + b * A.bs_m2 + lo, b2, len);
    } else {
      std::fill(b2, b2 + len, 0.0f);
    }
    if (O3 && has_m3) {
      load_tile(reinterpret_cast<const TX*>(A.m3) + b * A.bs_m3 + lo, b3, len);
    } else if (O3) {
      std::fill(b3, b3 + len, 0.0f);
    }
    const int clip = A.clip;
    const float clip_r = A.clip_r;
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      unipc_element<PRED, O3>(cf, bx[k], bm[k], clip, clip_r, 1, bl[k], 1, b1[k], 1, b2[k], 1,
                              O3 ? b3[k] : 0.0f, oc[k], om[k], on[k]);
    }
    store_tile(reinterpret_cast<TX*>(A.xc) + b * A.inner + lo, oc, len);
    store_tile(reinterpret_cast<TX*>(A.x0) + b * A.inner + lo, om, len);
    store_tile(reinterpret_cast<TX*>(A.xn) + b * A.inner + lo, on, len);
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
  check_arg(A.pred >= 0 && A.pred <= 2, "unipc_step: prediction type code must be 0, 1 or 2");
  check_arg(A.cfg == (A.mu != 0), "unipc_step: cfg needs the uncond operand and only then");
  check_arg(A.m3 == 0 || (A.m2 != 0 && A.m1 != 0),
            "unipc_step: m_prev3 needs m_prev2 and m_prev");
  if (A.n * A.inner == 0) return;
  // coef is host memory here: a row without order-3 terms runs the order-2 loop (NaN != 0)
  const bool o3 = A.m3 != 0 || (A.m2 != 0 && reinterpret_cast<const float*>(A.coef)[11] != 0.0f);
  FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_x, "unipc_step", [&] {
    using TX = scalar_t;
    FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_m, "unipc_step", [&] {
      if (o3) {
        run_pred<TX, scalar_t, true>(A);
      } else {
        run_pred<TX, scalar_t, false>(A);
      }
    });
  });
}

}  // namespace fastdiff
