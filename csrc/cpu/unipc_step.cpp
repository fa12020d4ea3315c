// CPU kernel of the fused UniPC step: OpenMP over (sample, tile) tasks, per-element math from
// fastdiff/unipc_math.h (shared with the CUDA kernel).
#include <algorithm>

#include "fastdiff/common.h"
#include "fastdiff/cpu_parallel.h"
#include "fastdiff/unipc_math.h"

namespace fastdiff {
namespace {

constexpr int64_t kTile = 4096;

template <typename TX, typename TM, int PRED>
void run(const UniPCArgs& A) {
  const float* c = reinterpret_cast<const float*>(A.coef);
  float coef[kUniPCCoefLen];
  for (int k = 0; k < kUniPCCoefLen; ++k) coef[k] = c[k];
  const int64_t tiles = (A.inner + kTile - 1) / kTile;
  parallel_tasks(A.n * tiles, kTile, [&](int64_t task) {
    const int64_t b = task / tiles, lo = (task % tiles) * kTile;
    const int64_t hi = std::min(A.inner, lo + kTile);
    const TX* x = reinterpret_cast<const TX*>(A.x) + b * A.bs_x;
    const TM* m = reinterpret_cast<const TM*>(A.m) + b * A.bs_m;
    const TM* mu = A.mu ? reinterpret_cast<const TM*>(A.mu) + b * A.bs_mu : nullptr;
    const TX* last = A.last ? reinterpret_cast<const TX*>(A.last) + b * A.bs_last : nullptr;
    const TX* m1 = A.m1 ? reinterpret_cast<const TX*>(A.m1) + b * A.bs_m1 : nullptr;
    const TX* m2 = A.m2 ? reinterpret_cast<const TX*>(A.m2) + b * A.bs_m2 : nullptr;
    TX* xc = reinterpret_cast<TX*>(A.xc) + b * A.inner;
    TX* x0 = reinterpret_cast<TX*>(A.x0) + b * A.inner;
    TX* xn = reinterpret_cast<TX*>(A.xn) + b * A.inner;
    for (int64_t e = lo; e < hi; ++e) {
      float mo = HostIO<TM>::load(m + e);
      if (mu) mo = cfg_combine(mo, HostIO<TM>::load(mu + e), A.g);
      float vc, vm, vn;
      unipc_element<PRED>(coef, HostIO<TX>::load(x + e), mo, A.clip, A.clip_r, last != nullptr,
                          last ? HostIO<TX>::load(last + e) : 0.0f, m1 != nullptr,
                          m1 ? HostIO<TX>::load(m1 + e) : 0.0f, m2 != nullptr,
                          m2 ? HostIO<TX>::load(m2 + e) : 0.0f, vc, vm, vn);
      HostIO<TX>::store(xc + e, vc);
      HostIO<TX>::store(x0 + e, vm);
      HostIO<TX>::store(xn + e, vn);
    }
  });
}

template <typename TX, typename TM>
void run_pred(const UniPCArgs& A) {
  if (A.pred == kEpsilon) return run<TX, TM, kEpsilon>(A);
  if (A.pred == kVPrediction) return run<TX, TM, kVPrediction>(A);
  return run<TX, TM, kSample>(A);
}

}  // namespace

void unipc_step_cpu(const UniPCArgs& A) {
  check_arg(A.pred >= 0 && A.pred <= 2, "unipc_step: prediction type code must be 0, 1 or 2");
  check_arg(A.cfg == (A.mu != 0), "unipc_step: cfg needs the uncond operand and only then");
  if (A.n * A.inner == 0) return;
  FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_x, "unipc_step", [&] {
    using TX = scalar_t;
    FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_m, "unipc_step", [&] { run_pred<TX, scalar_t>(A); });
  });
}

}  // namespace fastdiff
