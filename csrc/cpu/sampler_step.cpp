// CPU kernel of the fused sampler update: OpenMP over (sample, tile) pairs, each tile staged
// through fp32 buffers in L1 so the math and Philox loops vectorise (omp simd).
// No FP traps are ever enabled: let GCC if-convert the selects in the tile loops (vectorise).
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <cstring>

#include "fastdiff/philox.h"
#include "fastdiff/sampler_math.h"

namespace fastdiff {
namespace {

constexpr int64_t kTile = 512;

// Philox + Box-Muller is the compute-heavy part: an AVX2 clone (8 lanes, picked at load time via
// ifunc) besides the baseline SSE2 one. No FMA in the clone, so results equal the baseline's.
#if defined(__x86_64__) && defined(__GNUC__)
#define FD_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FD_CPU_CLONES
#endif

// z[j] = N(0,1) of counter (hi[j]:lo[j]); 32-bit lanes only, so the loop vectorises fully.
FD_CPU_CLONES void fill_normals(float* __restrict z, const uint32_t* __restrict lo,
                                const uint32_t* __restrict hi, int64_t len, uint32_t key0,
                                uint32_t key1) {
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) z[j] = philox_randn2(key0, key1, lo[j], hi[j]);
}

template <typename T>
inline void load_tile(const T* p, int64_t len, float* dst) {
  for (int64_t j = 0; j < len; ++j) dst[j] = HostIO<T>::load(p + j);
}
template <>
inline void load_tile<float>(const float* p, int64_t len, float* dst) {
  std::memcpy(dst, p, (size_t)len * sizeof(float));
}
template <typename T>
inline void store_tile(T* p, int64_t len, const float* src) {
  for (int64_t j = 0; j < len; ++j) HostIO<T>::store(p + j, src[j]);
}
template <>
inline void store_tile<float>(float* p, int64_t len, const float* src) {
  std::memcpy(p, src, (size_t)len * sizeof(float));
}

template <typename TX, typename TM, int PRED>
void run(const StepArgs& A) {
  const StepOptions o = A.opt;
  const float* cp = reinterpret_cast<const float*>(A.coef);
  const float a = cp[0], s = cp[1], k2 = cp[2], k3 = cp[3], k4 = cp[4], k5 = cp[5], k6 = cp[6],
              k7 = cp[7];
  uint32_t key0 = 0, key1 = 0;
  int64_t offset = 0;
  if (A.gen) {
    const int64_t* g = reinterpret_cast<const int64_t*>(A.gen);
    const uint64_t seed = (uint64_t)g[0];
    key0 = (uint32_t)seed;
    key1 = (uint32_t)(seed >> 32);
    offset = g[1];
  }
  const TX* X = reinterpret_cast<const TX*>(A.x);
  const TM* Mc = reinterpret_cast<const TM*>(A.m);
  const TM* Mu = reinterpret_cast<const TM*>(A.mu);
  const TM* V = reinterpret_cast<const TM*>(A.v);
  const TX* Z = reinterpret_cast<const TX*>(A.z);
  TX* Out = reinterpret_cast<TX*>(A.out);
  TX* X0 = reinterpret_cast<TX*>(A.x0);
  const int64_t M = A.inner;
  const int64_t tiles = (M + kTile - 1) / kTile;
  const int64_t total = A.n * tiles;
  const bool philox = A.gen != 0 && A.opt.mode == 0;
  // Fork threads only when the work pays for it (Philox costs ~8x a plain element).
  const bool parallel = total > 1 && A.n * M * (philox ? 8 : 1) >= (int64_t(1) << 16);
#pragma omp parallel for schedule(dynamic, 4) if (parallel)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t n = t / tiles;
    const int64_t i0 = (t - n * tiles) * kTile;
    const int64_t len = std::min(kTile, M - i0);
    alignas(64) float xb[kTile], mb[kTile], ub[kTile], vb[kTile], zb[kTile], ob[kTile], x0b[kTile];
    alignas(64) uint32_t clo[kTile], chi[kTile];
    load_tile(X + n * A.bs_x + i0, len, xb);
    load_tile(Mc + n * A.bs_m + i0, len, mb);
    const float* up = mb;
    const float* sp = mb;
    const float* zp = mb;
    if (o.cfg) {
      load_tile(Mu + n * A.bs_mu + i0, len, ub);
      up = ub;
    }
    if (o.learned_var) {  // sigma per element (expf: its own loop so the main loop vectorises)
      load_tile(V + n * A.bs_v + i0, len, vb);
      for (int64_t j = 0; j < len; ++j) vb[j] = learned_sigma(k5, vb[j], k6, k7);
      sp = vb;
    }
    if (Z) {
      load_tile(Z + n * A.bs_z + i0, len, zb);
      zp = zb;
    } else if (philox) {
      const uint64_t base = (uint64_t)offset + (uint64_t)(n * M);
      if (A.nhwc_c > 0) {  // memory index i = hw * C + c -> logical c * HW + hw
        int64_t hw = i0 / A.nhwc_c, c = i0 - hw * A.nhwc_c;
        for (int64_t j = 0; j < len; ++j) {
          const uint64_t ctr = base + (uint64_t)(c * A.hw + hw);
          clo[j] = (uint32_t)ctr;
          chi[j] = (uint32_t)(ctr >> 32);
          if (++c == A.nhwc_c) {
            c = 0;
            ++hw;
          }
        }
      } else {  // base + i0 + j in 32-bit halves (carry into hi when lo wraps)
        const uint64_t b0 = base + (uint64_t)i0;
        const uint32_t blo = (uint32_t)b0, bhi = (uint32_t)(b0 >> 32);
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) {
          const uint32_t l = blo + (uint32_t)j;
          clo[j] = l;
          chi[j] = bhi + (l < blo ? 1u : 0u);
        }
      }
      fill_normals(zb, clo, chi, len, key0, key1);
      zp = zb;
    }
    if (o.mode == 0) {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        // unconditional loads (every pointer is valid) keep the loop free of control flow
        const float uv = up[j], sv = sp[j], zv = zp[j];
        const float m = o.cfg ? cfg_combine(mb[j], uv, o.g) : mb[j];
        float x0, eps;
        predict_x0_eps<PRED>(xb[j], m, a, s, o.clip, o.clip_r, o.recompute, true, x0, eps);
        const float sigma = o.learned_var ? sv : k5;
        ob[j] = sampler_update(k2, k3, k4, xb[j], x0, eps, o.has_z, sigma, zv);
        x0b[j] = x0;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) {
        const float uv = up[j], zv = zp[j];
        const float m = o.cfg ? cfg_combine(mb[j], uv, o.g) : mb[j];
        float x0, eps;
        predict_x0_eps<PRED>(xb[j], m, a, s, o.clip, o.clip_r, 0, false, x0, eps);
        ob[j] = dpm2m_update(k2, k3, k4, xb[j], x0, o.has_z, zv);
        x0b[j] = x0;
      }
    }
    store_tile(Out + n * M + i0, len, ob);
    if (X0) store_tile(X0 + n * M + i0, len, x0b);
  }
}

template <typename TX, typename TM>
void run_pred(const StepArgs& A) {
  switch (A.opt.pred) {
    case kEpsilon: return run<TX, TM, kEpsilon>(A);
    case kVPrediction: return run<TX, TM, kVPrediction>(A);
    case kSample: return run<TX, TM, kSample>(A);
    default: throw std::invalid_argument("fastdiff: sampler_step: unknown prediction type");
  }
}

}  // namespace

void sampler_step_cpu(const StepArgs& A) {
  check_arg(A.n >= 0 && A.inner >= 0, "sampler_step: negative size");
  check_arg(A.x && A.m && A.coef && A.out, "sampler_step: null operand");
  check_arg(!A.opt.cfg || A.mu, "sampler_step: cfg needs the uncond operand");
  check_arg(!A.opt.learned_var || A.v, "sampler_step: learned_var needs the variance operand");
  if (A.n == 0 || A.inner == 0) return;
  FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_x, "sampler_step", [&] {
    using TX = scalar_t;
    FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_m, "sampler_step", [&] {
      using TM = scalar_t;
      run_pred<TX, TM>(A);
    });
  });
}

}  // namespace fastdiff
