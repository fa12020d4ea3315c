// CPU kernel of the fused sampler update: OpenMP over (sample, tile) pairs, each tile staged
// through fp32 buffers in L1 so the math and Philox loops vectorise (omp simd).
// No FP traps are ever enabled: let GCC if-convert the selects in the tile loops (vectorise).
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "fastdiff/philox.h"
#include "fastdiff/sampler_math.h"

namespace fastdiff {
namespace {

constexpr int64_t kTile = 512;
constexpr int64_t kGrain = int64_t(1) << 15;  // work units per parallel region (see run())

// Planar normals: (p0, p1, p2, p3)[k] = tl.randn4x of counter (hi[k]:lo[k]); baseline (SSE2)
// vectorised loop, 32-bit lanes only.
void fill_normals4_base(float* __restrict p0, float* __restrict p1, float* __restrict p2,
                        float* __restrict p3, const uint32_t* __restrict lo,
                        const uint32_t* __restrict hi, int64_t len, uint32_t key0, uint32_t key1) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k)
    philox_randn4(key0, key1, lo[k], hi[k], p0[k], p1[k], p2[k], p3[k]);
}

// ---- AVX2+FMA Philox + Box-Muller, 16 counters per loop step (two independent 8-lane groups, so
// the out-of-order core overlaps their dependency chains). The Philox integer rounds are exactly
// philox4x32_10's; the Box-Muller float math is philox_box_muller's with FMAs, an Estrin-scheme
// log polynomial and the hardware square root (latency: a Horner chain bounded the loop), so
// normals equal the scalar path's to within ~5 ulp (7.2e-7 absolute over 1.6M normals), not bit
// for bit (the stream promise is "to the float rounding of log/cos/sin", <= 1e-5 absolute).
#if defined(__x86_64__) && defined(__GNUC__)
#define FD_HAVE_AVX2_PHILOX 1
#define FD_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#define FD_PS(v) _mm256_set1_ps(v)

// (hi, lo) 32-bit halves of the 64-bit products a * b per 32-bit lane (b a broadcast constant).
FD_AVX2 void mul_hi_lo8(__m256i a, __m256i b, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), b);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// One Philox4x32 round on a group of 8 counters; k0, k1 are the broadcast round keys.
FD_AVX2 void philox_round8(__m256i& c0, __m256i& c1, __m256i& c2, __m256i& c3, __m256i k0,
                           __m256i k1) {
  __m256i hb, lb, ha, la;
  mul_hi_lo8(c2, _mm256_set1_epi32((int)0xCD9E8D57u), hb, lb);
  mul_hi_lo8(c0, _mm256_set1_epi32((int)0xD2511F53u), ha, la);
  c0 = _mm256_xor_si256(_mm256_xor_si256(hb, c1), k0);
  c2 = _mm256_xor_si256(_mm256_xor_si256(ha, c3), k1);
  c1 = lb;
  c3 = la;
}

FD_AVX2 __m256 uniform8(__m256i u) {  // philox_uniform
  const __m256i i = _mm256_xor_si256(u, _mm256_srai_epi32(u, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(i), FD_PS(4.6566127342e-10f));
}

FD_AVX2 __m256 logf8(__m256 x) {  // fd_logf (Cephes logf), polynomial by Estrin's scheme
  const __m256i ix = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(ix, 23), _mm256_set1_epi32(0xff)),
                               _mm256_set1_epi32(126));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(ix, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  const __m256 small = _mm256_cmp_ps(m, FD_PS(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(small));  // mask is -1 where small
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), FD_PS(1.0f));
  const __m256 z = _mm256_mul_ps(m, m), z2 = _mm256_mul_ps(z, z), z4 = _mm256_mul_ps(z2, z2);
  // p(m) = c0 m^8 + c1 m^7 + ... + c8
  const __m256 p78 = _mm256_fmadd_ps(FD_PS(-2.4999993993e-1f), m, FD_PS(3.3333331174e-1f));
  const __m256 p56 = _mm256_fmadd_ps(FD_PS(-1.6668057665e-1f), m, FD_PS(2.0000714765e-1f));
  const __m256 p34 = _mm256_fmadd_ps(FD_PS(-1.2420140846e-1f), m, FD_PS(1.4249322787e-1f));
  const __m256 p12 = _mm256_fmadd_ps(FD_PS(-1.1514610310e-1f), m, FD_PS(1.1676998740e-1f));
  const __m256 p58 = _mm256_fmadd_ps(p56, z, p78);
  const __m256 p14 = _mm256_fmadd_ps(p12, z, p34);
  const __m256 p18 = _mm256_fmadd_ps(p14, z2, p58);
  const __m256 poly = _mm256_fmadd_ps(FD_PS(7.0376836292e-2f), z4, p18);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(poly, m), z);
  const __m256 fe = _mm256_cvtepi32_ps(e);
  y = _mm256_fmadd_ps(FD_PS(-2.12194440e-4f), fe, y);
  y = _mm256_fmadd_ps(FD_PS(-0.5f), z, y);
  return _mm256_fmadd_ps(FD_PS(0.693359375f), fe, _mm256_add_ps(m, y));
}

FD_AVX2 void sincos8(__m256 t, __m256& sn, __m256& cs) {  // fd_sincos_small
  const __m256i q = _mm256_cvttps_epi32(_mm256_fmadd_ps(t, FD_PS(0.636619772367581343f), FD_PS(0.5f)));
  const __m256 fq = _mm256_cvtepi32_ps(q);
  __m256 r = _mm256_fnmadd_ps(fq, FD_PS(1.5703125f), t);
  r = _mm256_fnmadd_ps(fq, FD_PS(4.837512969970703125e-4f), r);
  r = _mm256_fnmadd_ps(fq, FD_PS(7.54978995489188216e-8f), r);
  const __m256 z = _mm256_mul_ps(r, r);
  const __m256 ps = _mm256_fmadd_ps(
      _mm256_fmadd_ps(FD_PS(-1.9515295891e-4f), z, FD_PS(8.3321608736e-3f)), z,
      FD_PS(-1.6666654611e-1f));
  const __m256 s = _mm256_fmadd_ps(_mm256_mul_ps(r, z), ps, r);
  const __m256 pc = _mm256_fmadd_ps(
      _mm256_fmadd_ps(FD_PS(2.443315711809948e-5f), z, FD_PS(-1.388731625493765e-3f)), z,
      FD_PS(4.166664568298827e-2f));
  const __m256 c = _mm256_fmadd_ps(_mm256_mul_ps(z, z), pc, _mm256_fnmadd_ps(FD_PS(0.5f), z, FD_PS(1.0f)));
  const __m256i one = _mm256_set1_epi32(1);
  const __m256 odd = _mm256_castsi256_ps(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_and_si256(q, one)));
  const __m256 cneg = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_and_si256(_mm256_srli_epi32(_mm256_add_epi32(q, one), 1), one), 31));
  const __m256 sneg = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(q, 1), one), 31));
  cs = _mm256_xor_ps(_mm256_blendv_ps(c, s, odd), cneg);
  sn = _mm256_xor_ps(_mm256_blendv_ps(s, c, odd), sneg);
}

FD_AVX2 void box_muller8(__m256i ua, __m256i ub, __m256& n0, __m256& n1) {
  const __m256i b = _mm256_max_epi32(_mm256_castps_si256(uniform8(ua)), _mm256_set1_epi32(0x33d6bf95));
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(FD_PS(-2.0f), logf8(_mm256_castsi256_ps(b))));
  __m256 sn, cs;
  sincos8(_mm256_mul_ps(FD_PS(6.283185307179586f), uniform8(ub)), sn, cs);
  n0 = _mm256_mul_ps(r, cs);
  n1 = _mm256_mul_ps(r, sn);
}
#undef FD_PS

// Philox (10 rounds) and Box-Muller on counters lo/hi + [k, k + 8 * G): G groups of 8 at once.
template <int G>
FD_AVX2 void normals8x(float* p0, float* p1, float* p2, float* p3, const uint32_t* lo,
                       const uint32_t* hi, int64_t k, uint32_t key0, uint32_t key1) {
  __m256i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    c0[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + k + 8 * g));
    c1[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + k + 8 * g));
    c2[g] = c3[g] = _mm256_setzero_si256();
  }
  uint32_t k0 = key0, k1 = key1;
  for (int r = 0; r < 10; ++r) {
    const __m256i kv0 = _mm256_set1_epi32((int)k0), kv1 = _mm256_set1_epi32((int)k1);
    for (int g = 0; g < G; ++g) philox_round8(c0[g], c1[g], c2[g], c3[g], kv0, kv1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  for (int g = 0; g < G; ++g) {
    __m256 n0, n1, n2, n3;
    box_muller8(c0[g], c1[g], n0, n1);
    box_muller8(c2[g], c3[g], n2, n3);
    const int64_t o = k + 8 * g;
    _mm256_storeu_ps(p0 + o, n0);
    _mm256_storeu_ps(p1 + o, n1);
    _mm256_storeu_ps(p2 + o, n2);
    _mm256_storeu_ps(p3 + o, n3);
  }
}

__attribute__((target("avx2,fma"))) void fill_normals4_avx2(
    float* __restrict p0, float* __restrict p1, float* __restrict p2, float* __restrict p3,
    const uint32_t* __restrict lo, const uint32_t* __restrict hi, int64_t len, uint32_t key0,
    uint32_t key1) {
  int64_t k = 0;
  // 4 groups of 8 in flight: the ten dependent Philox rounds of one group are latency-bound
  // (2.7 ns per counter with 2 groups, 2.3 with 4, measured in isolation).
  for (; k + 32 <= len; k += 32) normals8x<4>(p0, p1, p2, p3, lo, hi, k, key0, key1);
  for (; k + 16 <= len; k += 16) normals8x<2>(p0, p1, p2, p3, lo, hi, k, key0, key1);
  for (; k + 8 <= len; k += 8) normals8x<1>(p0, p1, p2, p3, lo, hi, k, key0, key1);
  for (; k < len; ++k) philox_randn4(key0, key1, lo[k], hi[k], p0[k], p1[k], p2[k], p3[k]);
}

// out[4k + j] = pj[k] for k < len: 8 counters (32 floats) per step as a 4x8 transpose.
__attribute__((target("avx2"))) void interleave4_avx2(float* __restrict out,
                                                      const float* __restrict p0,
                                                      const float* __restrict p1,
                                                      const float* __restrict p2,
                                                      const float* __restrict p3, int64_t len) {
  int64_t k = 0;
  for (; k + 8 <= len; k += 8) {
    const __m256 a = _mm256_loadu_ps(p0 + k), b = _mm256_loadu_ps(p1 + k);
    const __m256 c = _mm256_loadu_ps(p2 + k), d = _mm256_loadu_ps(p3 + k);
    const __m256 ab0 = _mm256_unpacklo_ps(a, b), ab1 = _mm256_unpackhi_ps(a, b);  // a0 b0 a1 b1
    const __m256 cd0 = _mm256_unpacklo_ps(c, d), cd1 = _mm256_unpackhi_ps(c, d);
    const __m256 q0 = _mm256_shuffle_ps(ab0, cd0, 0x44), q1 = _mm256_shuffle_ps(ab0, cd0, 0xEE);
    const __m256 q2 = _mm256_shuffle_ps(ab1, cd1, 0x44), q3 = _mm256_shuffle_ps(ab1, cd1, 0xEE);
    // q0 = counters (0, 4), q1 = (1, 5), q2 = (2, 6), q3 = (3, 7): one counter per 128-bit half
    _mm256_storeu_ps(out + 4 * k, _mm256_permute2f128_ps(q0, q1, 0x20));
    _mm256_storeu_ps(out + 4 * k + 8, _mm256_permute2f128_ps(q2, q3, 0x20));
    _mm256_storeu_ps(out + 4 * k + 16, _mm256_permute2f128_ps(q0, q1, 0x31));
    _mm256_storeu_ps(out + 4 * k + 24, _mm256_permute2f128_ps(q2, q3, 0x31));
  }
  for (; k < len; ++k) {
    out[4 * k] = p0[k];
    out[4 * k + 1] = p1[k];
    out[4 * k + 2] = p2[k];
    out[4 * k + 3] = p3[k];
  }
}
#endif

void fill_normals4(float* p0, float* p1, float* p2, float* p3, const uint32_t* lo,
                   const uint32_t* hi, int64_t len, uint32_t key0, uint32_t key1) {
#ifdef FD_HAVE_AVX2_PHILOX
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return fill_normals4_avx2(p0, p1, p2, p3, lo, hi, len, key0, key1);
#endif
  fill_normals4_base(p0, p1, p2, p3, lo, hi, len, key0, key1);
}

void interleave4(float* out, const float* p0, const float* p1, const float* p2, const float* p3,
                 int64_t len) {
#ifdef FD_HAVE_AVX2_PHILOX
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return interleave4_avx2(out, p0, p1, p2, p3, len);
#endif
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
  if (r == 0 && (len & 3) == 0) {  // whole counters: interleave straight into dst
    interleave4(dst, p0, p1, p2, p3, ng);
    return;
  }
  interleave4(buf, p0, p1, p2, p3, ng);
  std::memcpy(dst, buf + r, (size_t)len * sizeof(float));
}

// fp32 operands are read in place; other dtypes are converted into the fp32 tile buffer.
template <typename T>
inline const float* tile_in(const T* p, int64_t len, float* buf) {
  for (int64_t j = 0; j < len; ++j) buf[j] = HostIO<T>::load(p + j);
  return buf;
}
inline const float* tile_in(const float* p, int64_t, float*) { return p; }
template <typename T>
inline float* tile_out(T*, float* buf) {
  return buf;
}
inline float* tile_out(float* p, float*) { return p; }

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

// The elementwise math of one tile (fp32 buffers). PRED, the eps recomputation and the x0 store
// are template arguments so each loop is straight-line with no dead work (GCC if-converts the
// eps recomputation into a select it evaluates for every element otherwise); the other runtime
// options are loop invariant (GCC unswitches them) and copied to locals so no store to ob/x0b
// can alias them.
template <int PRED, bool RECOMP, bool X0>
inline __attribute__((always_inline)) void tile_math_t(
    const StepOptions& opt, const float* cf, int64_t len, const float* __restrict xb,
    const float* __restrict mb, const float* __restrict up, const float* __restrict sp,
    const float* __restrict zp, float* __restrict ob, float* __restrict x0b) {
  const int mode = opt.mode, cfg = opt.cfg, clip = opt.clip;
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
      ob[j] = sampler_update(k2, k3, k4, xb[j], x0, eps, has_z, sigma, zv);
      if (X0) x0b[j] = x0;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float uv = up[j], zv = zp[j];
      const float m = cfg ? cfg_combine(mb[j], uv, g) : mb[j];
      float x0, eps;
      predict_x0_eps<PRED>(xb[j], m, a, s, clip, clip_r, 0, false, x0, eps);
      ob[j] = dpm2m_update(k2, k3, k4, xb[j], x0, has_z, zv);
      if (X0) x0b[j] = x0;
    }
  }
}

template <bool RECOMP, bool X0>
inline __attribute__((always_inline)) void tile_math_p(int pred, const StepOptions& opt,
                                                       const float* cf, int64_t len,
                                                       const float* xb, const float* mb,
                                                       const float* up, const float* sp,
                                                       const float* zp, float* ob, float* x0b) {
  switch (pred) {
    case kEpsilon:
      return tile_math_t<kEpsilon, RECOMP, X0>(opt, cf, len, xb, mb, up, sp, zp, ob, x0b);
    case kVPrediction:
      return tile_math_t<kVPrediction, RECOMP, X0>(opt, cf, len, xb, mb, up, sp, zp, ob, x0b);
    default: return tile_math_t<kSample, RECOMP, X0>(opt, cf, len, xb, mb, up, sp, zp, ob, x0b);
  }
}

// x0 is stored only when asked for (x0b == nullptr otherwise).
#define FD_TILE_MATH_BODY                                                                   \
  const bool rc = opt.recompute != 0 && opt.clip != 0;                                      \
  if (x0b != nullptr) {                                                                     \
    if (rc) return tile_math_p<true, true>(pred, opt, cf, len, xb, mb, up, sp, zp, ob, x0b); \
    return tile_math_p<false, true>(pred, opt, cf, len, xb, mb, up, sp, zp, ob, x0b);        \
  }                                                                                         \
  if (rc) return tile_math_p<true, false>(pred, opt, cf, len, xb, mb, up, sp, zp, ob, x0b);  \
  return tile_math_p<false, false>(pred, opt, cf, len, xb, mb, up, sp, zp, ob, x0b);

using TileMathFn = void (*)(int, const StepOptions&, const float*, int64_t, const float*,
                            const float*, const float*, const float*, const float*, float*,
                            float*);

void tile_math_base(int pred, const StepOptions& opt, const float* cf, int64_t len,
                    const float* xb, const float* mb, const float* up, const float* sp,
                    const float* zp, float* ob, float* x0b) {
  FD_TILE_MATH_BODY
}

// AVX2+FMA clone: GCC contracts a * b + c into FMAs here (C++ default -ffp-contract=fast, as
// nvcc does on the GPU), which halves the arithmetic of the loop (it bounded the step in cache);
// the baseline (SSE2) clone rounds each product separately, so the two clones can differ in the
// last bit. Chosen once per process, so results are reproducible on one machine.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void tile_math_avx2(
    int pred, const StepOptions& opt, const float* cf, int64_t len, const float* xb,
    const float* mb, const float* up, const float* sp, const float* zp, float* ob, float* x0b) {
  FD_TILE_MATH_BODY
}
#endif
#undef FD_TILE_MATH_BODY

TileMathFn pick_tile_math() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return tile_math_avx2;
#endif
  return tile_math_base;
}

template <typename TX, typename TM, int PRED>
void run(const StepArgs& A) {
  const StepOptions o = A.opt;
  const float* cp = reinterpret_cast<const float*>(A.coef);
  float coefs[8];
  for (int k = 0; k < 8; ++k) coefs[k] = cp[k];
  const float k5 = coefs[5], k6 = coefs[6], k7 = coefs[7];
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
  static const TileMathFn tile_math = pick_tile_math();
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
    const float* xp = tile_in(X + n * A.bs_x + i0, len, xb);
    const float* mp = tile_in(Mc + n * A.bs_m + i0, len, mb);
    const float* up = mp;
    const float* sp = mp;
    const float* zp = mp;
    if (o.cfg) up = tile_in(Mu + n * A.bs_mu + i0, len, ub);
    if (o.learned_var) {  // sigma per element (expf: its own loop so the main loop vectorises)
      load_tile(V + n * A.bs_v + i0, len, vb);
      for (int64_t j = 0; j < len; ++j) vb[j] = learned_sigma(k5, vb[j], k6, k7);
      sp = vb;
    }
    if (Z) {
      zp = tile_in(Z + n * A.bs_z + i0, len, zb);
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
    // fp32 outputs are written in place; other dtypes go through the fp32 tiles
    float* op = tile_out(Out + n * M + i0, ob);
    float* x0p = X0 ? tile_out(X0 + n * M + i0, x0b) : nullptr;
    tile_math(PRED, o, coefs, len, xp, mp, up, sp, zp, op, x0p);
    if (op == ob) store_tile(Out + n * M + i0, len, ob);
    if (X0 && x0p == x0b) store_tile(X0 + n * M + i0, len, x0b);
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
