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

// Planar normals: (p0, p1, p2, p3)[k] = tl.randn4x of counter (hi[k]:lo[k]); 32-bit lanes only,
// so the loop vectorises fully.
FD_CPU_CLONES void fill_normals4(float* __restrict p0, float* __restrict p1,
                                 float* __restrict p2, float* __restrict p3,
                                 const uint32_t* __restrict lo, const uint32_t* __restrict hi,
                                 int64_t len, uint32_t key0, uint32_t key1) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) philox_randn4(key0, key1, lo[k], hi[k], p0[k], p1[k], p2[k], p3[k]);
}

constexpr int64_t kGroups = kTile / 4 + 4;  // counters per tile (+ partial groups at both ends)

// dst[0, len) = noise of logical elements [e0, e0 + len): element e is lane e % 4 of counter
// offset + e / 4 (len <= kTile + 8).
void normals_range(float* dst, uint64_t e0, int64_t len, uint64_t offset, uint32_t key0,
                   uint32_t key1) {
  alignas(64) uint32_t clo[kGroups], chi[kGroups];
  alignas(64) float p0[kGroups], p1[kGroups], p2[kGroups], p3[kGroups], buf[4 * kGroups];
  const int64_t r = (int64_t)(e0 & 3u);
  const int64_t ng = (r + len + 3) >> 2;
  const uint64_t c0 = offset + (e0 >> 2);
  const uint32_t blo = (uint32_t)c0, bhi = (uint32_t)(c0 >> 32);
#pragma omp simd
  for (int64_t k = 0; k < ng; ++k) {  // c0 + k in 32-bit halves (carry into hi when lo wraps)
    const uint32_t l = blo + (uint32_t)k;
    clo[k] = l;
    chi[k] = bhi + (l < blo ? 1u : 0u);
  }
  fill_normals4(p0, p1, p2, p3, clo, chi, ng, key0, key1);
  for (int64_t k = 0; k < ng; ++k) {
    buf[4 * k] = p0[k];
    buf[4 * k + 1] = p1[k];
    buf[4 * k + 2] = p2[k];
    buf[4 * k + 3] = p3[k];
  }
  std::memcpy(dst, buf + r, (size_t)len * sizeof(float));
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
  uint64_t offset = 0;
  if (A.gen) {
    const int64_t* g = reinterpret_cast<const int64_t*>(A.gen);
    const uint64_t seed = (uint64_t)g[0];
    key0 = (uint32_t)seed;
    key1 = (uint32_t)(seed >> 32);
    offset = (uint64_t)g[1];
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
      const uint64_t base = (uint64_t)(n * M);  // logical index of the sample's first element
      if (A.nhwc_c > 0) {
        // memory index i = hw * C + c <-> logical c * HW + hw: one logical run per channel
        const int64_t C = A.nhwc_c, i1 = i0 + len - 1;
        const int64_t hw0 = i0 / C, c0 = i0 - hw0 * C, hw1 = i1 / C, c1 = i1 - hw1 * C;
        alignas(64) float run[kTile + 8];
        for (int64_t c = 0; c < C; ++c) {
          const int64_t first = hw0 + (c < c0 ? 1 : 0), last = hw1 - (c > c1 ? 1 : 0);
          if (last < first) continue;
          normals_range(run, base + (uint64_t)(c * A.hw + first), last - first + 1, offset,
                        key0, key1);
          for (int64_t h = first; h <= last; ++h) zb[h * C + c - i0] = run[h - first];
        }
      } else {
        normals_range(zb, base + (uint64_t)i0, len, offset, key0, key1);
      }
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
