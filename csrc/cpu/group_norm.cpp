// Fused GroupNorm(+add, +scale/shift)+SiLU on CPU: OpenMP over work items, vectorised inner loops.
//
// NCHW: one task per (n, g). The (n, g) slab is C/G contiguous rows of HW elements; the task
// computes per-row shifted sums, merges them into the group's mean/M2 (GroupAcc), then applies
// y = act(a*x + b) row by row while the slab is still in L2 (one DRAM read of x for slabs that
// fit in cache). fp32 rows up to kTile (run_nchw_rows) take one stats call and one apply call per
// block of channels: at (8, 64, 4, 4) the per-row calls of the general path (run_nchw) cost more
// than the 32 elements of a group.
// NHWC: rows of C contiguous channels. fp32 samples up to 64k elements (run_nhwc_sample): one
// task per sample runs all passes in L2. Larger ones (run_nhwc): pass 1, tasks over
// (n, chunk of HW rows) accumulate per-channel shifted sums, vectorised along C; merge per
// (n, g); pass 2, tasks over (n, chunk) apply y = act(a[c]*x + b[c]) along C.
//
// Work is handed out dynamically (chunks of tasks, parallel_tasks): on a shared, oversubscribed
// machine a descheduled thread then holds back one chunk, not half of the work.
//
// The hot loops are plain float loops (no libm: SiLU uses gn::exp_poly), compiled for the
// baseline ISA and, on x86-64 GCC, also for x86-64-v3 (AVX2+FMA) via target_clones with
// runtime dispatch, so the binary stays portable (no -march=native).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "fastdiff/cpu_isa.h"
#include "fastdiff/cpu_parallel.h"
#include "fastdiff/cpu_tiles.h"
#include "fastdiff/group_norm_math.h"

#if FD_X86_DISPATCH
#include <immintrin.h>
#endif

#if FD_X86_DISPATCH && !defined(__clang__)
#define FD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FD_CLONES
#endif

// v8f values only live in registers inside always-inline helpers; no ABI crosses a call.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastdiff {
namespace {

constexpr int64_t kTile = 2048;      // elements per float accumulation / conversion tile
constexpr int64_t kChunkRows = 128;  // NHWC rows per task (per-channel float sums stay exact-ish)

// 8 fp32 lanes as a GCC/Clang vector extension: AVX registers in the x86-64-v3 clone, SSE pairs
// in the baseline one. Written explicitly because auto-vectorised float reductions need
// reassociation the compiler may not do without -ffast-math.
typedef float v8f __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 8-lane sums *s1 = sum(x - k), *s2 = sum((x - k)^2) over the leading elements of x[0, n) that
// fill whole vectors (row_shifted_sums' and rows_shifted_sums' loop): two accumulator pairs
// over blocks of 16, then (kTail8) one more block of 8, the pairs added last. Returns how many
// elements that covered; the caller sums the rest.
template <bool kTail8>
__attribute__((always_inline)) inline int64_t lane_shifted_sums(const float* __restrict x,
                                                                int64_t n, float k, v8f* s1,
                                                                v8f* s2) {
  const v8f kv = {k, k, k, k, k, k, k, k};
  v8f a1 = {}, a2 = {}, b1 = {}, b2 = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v8f d0 = load8(x + i) - kv;
    const v8f d1 = load8(x + i + 8) - kv;
    a1 += d0;
    a2 += d0 * d0;
    b1 += d1;
    b2 += d1 * d1;
  }
  if (kTail8 && i + 8 <= n) {
    const v8f d0 = load8(x + i) - kv;
    a1 += d0;
    a2 += d0 * d0;
    i += 8;
  }
  *s1 = a1 + b1;
  *s2 = a2 + b2;
  return i;
}

// s1 += sum(x - k), s2 += sum((x - k)^2) over n <= kTile floats: fp32 lanes, fp64 totals.
FD_CLONES void row_shifted_sums(const float* __restrict x, int64_t n, float k, double* s1,
                                double* s2) {
  v8f a1, a2;
  int64_t i = lane_shifted_sums<false>(x, n, k, &a1, &a2);
  double r1 = 0.0, r2 = 0.0;
  for (; i < n; ++i) {
    const float d = x[i] - k;
    r1 += d;
    r2 += (double)d * d;
  }
  for (int j = 0; j < 8; ++j) {
    r1 += a1[j];
    r2 += a2[j];
  }
  *s1 += r1;
  *s2 += r2;
}

// y = act(a*x + b), scalar a, b (portable loops; the AVX2+FMA rows below take over on x86-64).
FD_CLONES void affine_act_row_generic(const float* __restrict x, float* __restrict y, int64_t n,
                                      float a, float b, bool silu) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) y[i] = gn::silu(gn::apply(x[i], a, b));
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = gn::apply(x[i], a, b);
  }
}

// y[c] = act(a[c]*x[c] + b[c]).
FD_CLONES void affine_act_vec_generic(const float* __restrict x, float* __restrict y, int64_t n,
                                      const float* __restrict a, const float* __restrict b,
                                      bool silu) {
  if (silu) {
    for (int64_t i = 0; i < n; ++i) y[i] = gn::silu(gn::apply(x[i], a[i], b[i]));
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = gn::apply(x[i], a[i], b[i]);
  }
}

#if FD_X86_DISPATCH
#define FD_HAVE_AVX2_SILU 1
#define FD_AVX2_FMA __attribute__((target("avx2,fma")))
#define FD_AVX2_FMA_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

// SiLU of 8 lanes, v / (1 + e^-v), 10 FMA-pipe ops per 8 elements (the portable loop needs ~18
// and bounds the kernel): gn::exp_poly's range reduction with FMAs (one ln2 constant: the product
// is not rounded separately), then e^r = 1 + r + r^2 P(r) on |r| <= ln2/2 with P a degree-3
// minimax fit (relative error 1.05e-7 in exact arithmetic; Cephes' degree 5 costs two more FMAs
// for accuracy fp32 cannot keep). Max relative error of the result against float64: 2.7e-7 over
// [-20, 20], 4.2e-7 (~3.5 ulp, near v = -88) over [-87, 88] (32M random points). NaN
// propagates through the division; t is clamped to [-87, 88] as in gn::exp_poly, and below
// v = -88 the result is v * 0 as in gn::silu (-0, or NaN for -inf: e^-v overflows).
FD_AVX2_FMA_INLINE __m256 silu8(__m256 v) {
  const __m256 under = _mm256_cmp_ps(v, _mm256_set1_ps(-88.0f), _CMP_LT_OQ);
  const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), v),
                                               _mm256_set1_ps(-87.0f)),
                                 _mm256_set1_ps(88.0f));
  const __m256 magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23: round to nearest integer
  const __m256 f = _mm256_fmadd_ps(t, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 nf = _mm256_sub_ps(f, magic);
  const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(f), _mm256_set1_epi32(0x4B400000));
  const __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693147180559945f), t);
  const __m256 r2 = _mm256_mul_ps(r, r);
  __m256 q = _mm256_set1_ps(8.3125230187e-3f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1890114209e-2f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6667114491e-1f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.9999231783e-1f));
  q = _mm256_fmadd_ps(q, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));  // e^r
  const __m256 pow2n = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  const __m256 y = _mm256_div_ps(v, _mm256_fmadd_ps(q, pow2n, _mm256_set1_ps(1.0f)));
  return _mm256_blendv_ps(y, _mm256_mul_ps(v, _mm256_setzero_ps()), under);
}

FD_AVX2_FMA void affine_act_row_avx2(const float* __restrict x, float* __restrict y, int64_t n,
                                     float a, float b, bool silu) {
  const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
  int64_t i = 0;
  if (silu) {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, silu8(_mm256_fmadd_ps(_mm256_loadu_ps(x + i), av, bv)));
  } else {
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), av, bv));
  }
  if (i < n) affine_act_row_generic(x + i, y + i, n - i, a, b, silu);
}

FD_AVX2_FMA void affine_act_vec_avx2(const float* __restrict x, float* __restrict y, int64_t n,
                                     const float* __restrict a, const float* __restrict b,
                                     bool silu) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v =
        _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(y + i, silu ? silu8(v) : v);
  }
  if (i < n) affine_act_vec_generic(x + i, y + i, n - i, a + i, b + i, silu);
}

// y = act(a[r] * x + b[r]) over `rows` contiguous rows of n floats (one call per channel chunk).
FD_AVX2_FMA void affine_act_rows_avx2(const float* __restrict x, float* __restrict y,
                                      int64_t rows, int64_t n, const float* __restrict a,
                                      const float* __restrict b, bool silu) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    const __m256 av = _mm256_set1_ps(a[r]), bv = _mm256_set1_ps(b[r]);
    int64_t i = 0;
    if (silu) {
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(yr + i, silu8(_mm256_fmadd_ps(_mm256_loadu_ps(xr + i), av, bv)));
      for (; i < n; ++i) yr[i] = gn::silu(gn::apply(xr[i], a[r], b[r]));
    } else {
      for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(yr + i, _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), av, bv));
      for (; i < n; ++i) yr[i] = gn::apply(xr[i], a[r], b[r]);
    }
  }
}

bool avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

inline void affine_act_row(const float* x, float* y, int64_t n, float a, float b, bool silu) {
#ifdef FD_HAVE_AVX2_SILU
  if (avx2_fma()) return affine_act_row_avx2(x, y, n, a, b, silu);
#endif
  affine_act_row_generic(x, y, n, a, b, silu);
}

inline void affine_act_rows(const float* x, float* y, int64_t rows, int64_t n, const float* a,
                            const float* b, bool silu) {
#ifdef FD_HAVE_AVX2_SILU
  if (avx2_fma()) return affine_act_rows_avx2(x, y, rows, n, a, b, silu);
#endif
  for (int64_t r = 0; r < rows; ++r)
    affine_act_row_generic(x + r * n, y + r * n, n, a[r], b[r], silu);
}

inline void affine_act_vec(const float* x, float* y, int64_t n, const float* a, const float* b,
                           bool silu) {
#ifdef FD_HAVE_AVX2_SILU
  if (avx2_fma()) return affine_act_vec_avx2(x, y, n, a, b, silu);
#endif
  affine_act_vec_generic(x, y, n, a, b, silu);
}

// s1[c] += x[c] - k[c], s2[c] += (x[c] - k[c])^2.
FD_CLONES void chan_shifted_sums(const float* __restrict x, int64_t n, const float* __restrict k,
                                 float* __restrict s1, float* __restrict s2) {
  for (int64_t i = 0; i < n; ++i) {
    float d = x[i] - k[i];
    s1[i] += d;
    s2[i] += d * d;
  }
}

// Per-row shifted sums of `rows` contiguous rows of n <= kTile floats: k[r] = the row's first
// element, s1[r] = sum(x - k[r]), s2[r] = sum((x - k[r])^2); fp32 lanes, pairwise lane sums.
// One call per group of channels: for small rows (HW = 16, 64) the per-row call, the fp64 lane
// reduction and the merge divisions of the general path cost more than the data.
FD_CLONES void rows_shifted_sums(const float* __restrict x, int64_t rows, int64_t n,
                                 float* __restrict k, float* __restrict s1,
                                 float* __restrict s2) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * n;
    const float kr = row[0];
    v8f a1, a2;
    int64_t i = lane_shifted_sums<true>(row, n, kr, &a1, &a2);
    float t1 = ((a1[0] + a1[4]) + (a1[2] + a1[6])) + ((a1[1] + a1[5]) + (a1[3] + a1[7]));
    float t2 = ((a2[0] + a2[4]) + (a2[2] + a2[6])) + ((a2[1] + a2[5]) + (a2[3] + a2[7]));
    for (; i < n; ++i) {
      const float d = row[i] - kr;
      t1 += d;
      t2 += d * d;
    }
    k[r] = kr;
    s1[r] = t1;
    s2[r] = t2;
  }
}

// NHWC: s1[c] += sum_r (x[r*C + c] - k[c]), s2[c] += sum_r (...)^2 over nr <= kChunkRows rows,
// 32 channels at a time with the sums in registers (the per-row chan_shifted_sums loop reloads
// and stores both sum arrays for every row).
FD_CLONES void chan_block_sums(const float* __restrict x, int64_t C, int64_t nr,
                               const float* __restrict k, float* __restrict s1,
                               float* __restrict s2) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    const v8f k0 = load8(k + c), k1 = load8(k + c + 8), k2 = load8(k + c + 16),
              k3 = load8(k + c + 24);
    v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, q0 = {}, q1 = {}, q2 = {}, q3 = {};
    for (int64_t r = 0; r < nr; ++r) {
      const float* row = x + r * C + c;
      const v8f d0 = load8(row) - k0, d1 = load8(row + 8) - k1;
      const v8f d2 = load8(row + 16) - k2, d3 = load8(row + 24) - k3;
      a0 += d0;
      a1 += d1;
      a2 += d2;
      a3 += d3;
      q0 += d0 * d0;
      q1 += d1 * d1;
      q2 += d2 * d2;
      q3 += d3 * d3;
    }
    const v8f* acc[8] = {&a0, &a1, &a2, &a3, &q0, &q1, &q2, &q3};
    for (int v = 0; v < 4; ++v)
      for (int j = 0; j < 8; ++j) {
        s1[c + 8 * v + j] += (*acc[v])[j];
        s2[c + 8 * v + j] += (*acc[4 + v])[j];
      }
  }
  for (int64_t r = 0; r < nr; ++r) chan_shifted_sums(x + r * C + c, C - c, k + c, s1 + c, s2 + c);
}

struct Params {
  const float *w, *b, *add, *scale, *shift;
  float eps;
  bool silu;
  void fold_channel(int64_t n, int64_t C, int64_t c, float mean, float rstd, float* a,
                    float* bb) const {
    const int64_t nc = n * C + c;
    gn::fold(mean, rstd, w ? w[c] : 1.0f, b ? b[c] : 0.0f, add ? add[nc] : 0.0f,
             scale ? scale[nc] : 0.0f, shift ? shift[nc] : 0.0f, a, bb);
  }
};

// Merges per-channel moments (mean_c, M2_c over hw elements each) into the group's mean and
// rstd without a division chain: M2 = sum M2_c + hw * sum (mean_c - mean)^2, that last sum taken
// shifted by the first channel's mean (d1 = sum e, d2 = sum e^2, e = mean_c - mean_first).
struct GroupAcc {
  double mu0 = 0.0, d1 = 0.0, d2 = 0.0, m2 = 0.0;
  int64_t count = 0;
  // one channel from its shifted sums s1, s2 about the shift k (inv_hw = 1 / hw)
  inline void add_channel(double k, double s1, double s2, double inv_hw, double add) {
    const double d = s1 * inv_hw;
    const double mc = k + d + add;
    const double v = s2 - s1 * d;
    m2 += gn::nonneg(v);
    if (count++ == 0) mu0 = mc;
    const double e = mc - mu0;
    d1 += e;
    d2 += e * e;
  }
  inline void finish(int64_t hw, float eps, float* mean, float* rstd) const {
    const double dm = d1 / (double)count;
    const double spread = d2 - d1 * dm;
    const double total = m2 + (double)hw * gn::nonneg(spread);
    *mean = (float)(mu0 + dm);
    *rstd = gn::rstd_from((float)(total / ((double)count * (double)hw)), eps);
  }
};

constexpr int64_t kChanBlock = 64;  // channels per stats/apply call in run_nchw_rows

// NCHW fp32 with rows of HW <= kTile: per (n, g) task, the slab's per-row shifted sums come from
// one call per block of channels; the channel moments merge without a division chain
// (mean_c = k + s1/HW, M2_c = s2 - s1 * (s1/HW), then the group's M2 = sum M2_c +
// HW * sum (mean_c - mean)^2, the last sum shifted by the first channel's mean); then one apply
// call per block. Same statistics as run_nchw (shifted by a member of each row, fp64 merge).
void run_nchw_rows(const float* x, float* y, int64_t N, int64_t C, int64_t HW, int64_t G,
                   const Params& p) {
  const int64_t cpg = C / G;
  const int64_t tasks = N * G;
  const double inv_hw = 1.0 / (double)HW;
  parallel_tasks(tasks, cpg * HW, [&](int64_t t) {
    const int64_t n = t / G, g = t % G;
    const int64_t c_begin = g * cpg;
    const float* slab = x + (n * C + c_begin) * HW;
    float k[kChanBlock], s1[kChanBlock], s2[kChanBlock];
    GroupAcc acc;
    for (int64_t c0 = 0; c0 < cpg; c0 += kChanBlock) {
      const int64_t nc = std::min(kChanBlock, cpg - c0);
      rows_shifted_sums(slab + c0 * HW, nc, HW, k, s1, s2);
      for (int64_t r = 0; r < nc; ++r)
        acc.add_channel(k[r], s1[r], s2[r], inv_hw, p.add ? p.add[n * C + c_begin + c0 + r] : 0.0);
    }
    float fmean, rstd;
    acc.finish(HW, p.eps, &fmean, &rstd);
    float a[kChanBlock], b[kChanBlock];
    for (int64_t c0 = 0; c0 < cpg; c0 += kChanBlock) {
      const int64_t nc = std::min(kChanBlock, cpg - c0);
      for (int64_t r = 0; r < nc; ++r)
        p.fold_channel(n, C, c_begin + c0 + r, fmean, rstd, &a[r], &b[r]);
      const int64_t off = (n * C + c_begin + c0) * HW;
      affine_act_rows(x + off, y + off, nc, HW, a, b, p.silu);
    }
  });
}

template <typename T>
void run_nchw(const T* x, T* y, int64_t N, int64_t C, int64_t HW, int64_t G, const Params& p) {
  const int64_t cpg = C / G;
  const int64_t tasks = N * G;
  const double inv_hw = 1.0 / (double)HW;
  parallel_tasks(tasks, cpg * HW, [&](int64_t t) {
    const int64_t n = t / G, g = t % G;
    float ibuf[kTile], obuf[kTile];
    GroupAcc acc;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      const T* row = x + (n * C + c) * HW;
      const float k = HostIO<T>::load(row);
      double s1 = 0.0, s2 = 0.0;
      for (int64_t i = 0; i < HW; i += kTile) {
        const int64_t len = std::min(kTile, HW - i);
        row_shifted_sums(as_f32(row + i, len, ibuf), len, k, &s1, &s2);
      }
      acc.add_channel(k, s1, s2, inv_hw, p.add ? p.add[n * C + c] : 0.0);
    }
    float fmean, rstd;
    acc.finish(HW, p.eps, &fmean, &rstd);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      float a, b;
      p.fold_channel(n, C, c, fmean, rstd, &a, &b);
      const T* row = x + (n * C + c) * HW;
      T* yrow = y + (n * C + c) * HW;
      for (int64_t i = 0; i < HW; i += kTile) {
        const int64_t len = std::min(kTile, HW - i);
        float* o = out_f32(yrow + i, obuf);
        affine_act_row(as_f32(row + i, len, ibuf), o, len, a, b, p.silu);
        flush_f32(yrow + i, o, len);
      }
    }
  });
}

constexpr int64_t kSampleElems = int64_t(1) << 16;  // run_nhwc_sample: one sample <= 256 KB

// NHWC fp32, samples of HW * C <= kSampleElems: one task per sample, its three passes (channel
// sums, group merge + fold, apply) back to back while the sample sits in L2, with per-thread
// scratch reused across calls (no allocation, one parallel region). Same statistics as run_nhwc:
// per-channel shift = the channel's first element, fp32 sums over <= kChunkRows rows, fp64 above.
void run_nhwc_sample(const float* x, float* y, int64_t N, int64_t C, int64_t HW, int64_t G,
                     const Params& p) {
  const int64_t cpg = C / G;
  const double inv_hw = 1.0 / (double)HW;
  parallel_tasks(N, HW * C, [&](int64_t n) {
    static thread_local std::vector<float> scratch;
    static thread_local std::vector<double> dscratch;
    if ((int64_t)scratch.size() < 5 * C) scratch.resize(5 * C);
    if ((int64_t)dscratch.size() < 2 * C) dscratch.resize(2 * C);
    float *K = scratch.data(), *s1 = K + C, *s2 = s1 + C, *A = s2 + C, *B = A + C;
    double *S1 = dscratch.data(), *S2 = S1 + C;
    const float* xs = x + n * HW * C;
    float* ys = y + n * HW * C;
    std::memcpy(K, xs, (size_t)C * sizeof(float));
    std::fill(S1, S1 + 2 * C, 0.0);
    for (int64_t r0 = 0; r0 < HW; r0 += kChunkRows) {
      const int64_t r1 = std::min(HW, r0 + kChunkRows);
      std::fill(s1, s1 + 2 * C, 0.0f);
      chan_block_sums(xs + r0 * C, C, r1 - r0, K, s1, s2);
      for (int64_t c = 0; c < C; ++c) {
        S1[c] += s1[c];
        S2[c] += s2[c];
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      GroupAcc acc;
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
        acc.add_channel(K[c], S1[c], S2[c], inv_hw, p.add ? p.add[n * C + c] : 0.0);
      float fmean, rstd;
      acc.finish(HW, p.eps, &fmean, &rstd);
      for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
        p.fold_channel(n, C, c, fmean, rstd, &A[c], &B[c]);
    }
    for (int64_t r = 0; r < HW; ++r) affine_act_vec(xs + r * C, ys + r * C, C, A, B, p.silu);
  });
}

template <typename T>
void run_nhwc(const T* x, T* y, int64_t N, int64_t C, int64_t HW, int64_t G, const Params& p) {
  const int64_t cpg = C / G;
  const double inv_hw = 1.0 / (double)HW;
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(kChunkRows, (1 << 16) / C));
  const int64_t chunks = (HW + rows - 1) / rows;
  const int64_t tasks = N * chunks;
  const bool par = N * C * HW > 16384;
  (void)par;
  // Shift per (n, c): the first spatial element of that channel.
  std::vector<float> K(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) K[n * C + c] = HostIO<T>::load(x + n * HW * C + c);
  std::vector<float> P1(tasks * C, 0.0f), P2(tasks * C, 0.0f);
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
  {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : C);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / chunks, r0 = (t % chunks) * rows;
      const int64_t r1 = std::min(HW, r0 + rows);
      for (int64_t r = r0; r < r1; ++r) {
        chan_shifted_sums(as_f32(x + (n * HW + r) * C, C, buf.data()), C, &K[n * C], &P1[t * C],
                          &P2[t * C]);
      }
    }
  }
  std::vector<float> A(N * C), B(N * C);
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (par)
#endif
  for (int64_t t = 0; t < N * G; ++t) {
    const int64_t n = t / G, g = t % G;
    GroupAcc acc;
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < chunks; ++k) {
        s1 += P1[(n * chunks + k) * C + c];
        s2 += P2[(n * chunks + k) * C + c];
      }
      acc.add_channel(K[n * C + c], s1, s2, inv_hw, p.add ? p.add[n * C + c] : 0.0);
    }
    float fmean, rstd;
    acc.finish(HW, p.eps, &fmean, &rstd);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c)
      p.fold_channel(n, C, c, fmean, rstd, &A[n * C + c], &B[n * C + c]);
  }
#ifdef _OPENMP
#pragma omp parallel if (par)
#endif
  {
    const bool conv = !std::is_same<T, float>::value;
    std::vector<float> ibuf(conv ? C : 0), obuf(conv ? C : 0);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / chunks, r0 = (t % chunks) * rows;
      const int64_t r1 = std::min(HW, r0 + rows);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = (n * HW + r) * C;
        float* o = out_f32(y + off, obuf.data());
        affine_act_vec(as_f32(x + off, C, ibuf.data()), o, C, &A[n * C], &B[n * C], p.silu);
        flush_f32(y + off, o, C);
      }
    }
  }
}

}  // namespace

void group_norm_silu_cpu(const GroupNormArgs& a) {
  check_arg(a.N > 0 && a.C > 0 && a.HW > 0 && a.G > 0, "group_norm_silu_cpu: empty or bad sizes");
  check_arg(a.C % a.G == 0, "group_norm_silu_cpu: C must be divisible by G");
  check_arg(a.x != 0 && a.y != 0, "group_norm_silu_cpu: null x or y");
  check_arg(a.wb_dtype == 0 && a.cond_dtype == 0, "group_norm_silu_cpu: operands must be fp32");
  for (int64_t rs : {a.add_rs, a.scale_rs, a.shift_rs})
    check_arg(rs == -1 || rs == a.C, "group_norm_silu_cpu: [N x C] operands must be contiguous");
  Params p{reinterpret_cast<const float*>(a.weight), reinterpret_cast<const float*>(a.bias),
           reinterpret_cast<const float*>(a.add),    reinterpret_cast<const float*>(a.scale),
           reinterpret_cast<const float*>(a.shift),  a.eps,
           a.silu};
  FASTDIFF_DISPATCH_HOST_DTYPE(a.dtype, "group_norm_silu_cpu", [&] {
    const scalar_t* x = reinterpret_cast<const scalar_t*>(a.x);
    scalar_t* y = reinterpret_cast<scalar_t*>(a.y);
    constexpr bool f32 = std::is_same<scalar_t, float>::value;
    if (a.nhwc && f32 && a.HW * a.C <= kSampleElems)
      run_nhwc_sample(reinterpret_cast<const float*>(a.x), reinterpret_cast<float*>(a.y), a.N,
                      a.C, a.HW, a.G, p);
    else if (a.nhwc)
      run_nhwc<scalar_t>(x, y, a.N, a.C, a.HW, a.G, p);
    else if (f32 && a.HW <= kTile)
      run_nchw_rows(reinterpret_cast<const float*>(a.x), reinterpret_cast<float*>(a.y), a.N, a.C,
                    a.HW, a.G, p);
    else
      run_nchw<scalar_t>(x, y, a.N, a.C, a.HW, a.G, p);
  });
}

}  // namespace fastdiff
