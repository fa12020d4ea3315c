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

#include "fastdiff/philox.h"
#include "fastdiff/sampler_math.h"

namespace fastdiff {
namespace {

// Elements per tile: 2048 (vs 1024, vs 512) halves the per-tile setup of the pipelined noise
// generator (keys, the first group's unoverlapped Philox): eta1 step ~5% faster at 1024, another
// 1-3% (paired per-round medians) at 2048; ~75 KB of stack buffers.
constexpr int64_t kTile = 2048;
constexpr int64_t kGrain = int64_t(1) << 15;  // work units per parallel region (see run())

// Planar normals: (p0, p1, p2, p3)[k] = tl.randn4x of counter (hi[k]:lo[k]); baseline (SSE2)
// vectorised loop, 32-bit lanes only (machines without AVX2+FMA).
void fill_normals4_base(float* __restrict p0, float* __restrict p1, float* __restrict p2,
                        float* __restrict p3, const uint32_t* __restrict lo,
                        const uint32_t* __restrict hi, int64_t len, uint32_t key0, uint32_t key1) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k)
    philox_randn4(key0, key1, lo[k], hi[k], p0[k], p1[k], p2[k], p3[k]);
}

// ---- AVX2+FMA Philox + Box-Muller, software pipelined: the ten Philox rounds of the next 8
// counters are interleaved (in program order) with the Box-Muller of the current 8, so the
// integer rounds (multiplies, shifts, xors) and the float log/sincos chains (~70 cycles of
// latency each) overlap in the out-of-order window; run back to back, each was latency-bound
// (normals 1.65 -> 1.35-1.4 ns per element at 1 thread on Zen 3).
//
// Philox: the 64-bit counters sit in 64-bit lanes (4 per vector, two vectors per group of 8). A
// 32x32->64 product is then one _mm256_mul_epu32 (it reads the low halves only), its high word
// one shift and its low word the product itself; a word whose upper half is never read keeps
// garbage there (c1, c3 and the new c0/c2 before they are multiplied), so a round costs 2
// multiplies, 2 shifts and 4 xors per 4 counters and no blends. Round 1 starts from c2 = c3 = 0
// (one multiply, c1' = 0) and round 2 skips the xor with that zero. The integer results equal
// philox4x32_10's exactly (the carry into the counter's high half is the 64-bit add).
//
// Box-Muller: philox_box_muller's float math with FMAs, an Estrin-scheme log polynomial with every
// constant times -2 (exact: it computes -2 log u directly), the hardware square root, and the
// m < sqrt(1/2) test and the sincos quadrant selects as integer bit operations (off the FMA
// pipes, which the multiplies of the Philox rounds share). Normals equal the scalar path's to
// within ~5 ulp (7.2e-7 absolute over 1.7M normals), not bit for bit (the stream promise is "to
// the float rounding of log/cos/sin", <= 1e-5 absolute).
#if FD_X86_DISPATCH
#define FD_HAVE_AVX2_PHILOX 1
#define FD_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline
#define FD_PS(v) _mm256_set1_ps(v)
#define FD_PI(v) _mm256_set1_epi32((int)(v))

FD_AVX2 __m256 uniform8(__m256i u) {  // philox_uniform
  const __m256i i = _mm256_xor_si256(u, _mm256_srai_epi32(u, 31));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(i), FD_PS(4.6566127342e-10f));
}

struct PhiloxKeys8 {  // round keys, in the low half of each 64-bit lane
  __m256i k0[10], k1[10];
};

FD_AVX2 void philox_keys8(PhiloxKeys8& K, uint32_t key0, uint32_t key1) {
  for (int r = 0; r < 10; ++r) {
    K.k0[r] = _mm256_set1_epi64x((long long)key0);
    K.k1[r] = _mm256_set1_epi64x((long long)key1);
    key0 += 0x9E3779B9u;
    key1 += 0xBB67AE85u;
  }
}

// Philox state of 8 counters: x?[0] holds counters (0, 2, 1, 3), x?[1] holds (4, 6, 5, 7), so
// that packing the low halves of the pair (pack_lo8) gives counters (0, 2, 4, 6 | 1, 3, 5, 7):
// the in-lane 4x4 transpose of store_interleaved8 then yields whole counter pairs in order.
struct PhiloxState8 {
  __m256i x0[2], x1[2], x2[2], x3[2];
};

// Rounds 1 and 2 of the counters ctr + [0, 8).
FD_AVX2 void philox_start8(PhiloxState8& S, uint64_t ctr, const PhiloxKeys8& K) {
  const __m256i ma = _mm256_set1_epi64x(0xD2511F53), mb = _mm256_set1_epi64x(0xCD9E8D57);
  const __m256i base = _mm256_set1_epi64x((long long)ctr);
  const __m256i v[2] = {_mm256_add_epi64(base, _mm256_setr_epi64x(0, 2, 1, 3)),
                        _mm256_add_epi64(base, _mm256_setr_epi64x(4, 6, 5, 7))};
  for (int i = 0; i < 2; ++i) {  // round 1: c2 = c3 = 0
    const __m256i pa = _mm256_mul_epu32(v[i], ma);
    S.x0[i] = _mm256_xor_si256(_mm256_srli_epi64(v[i], 32), K.k0[0]);
    S.x2[i] = _mm256_xor_si256(_mm256_srli_epi64(pa, 32), K.k1[0]);
    S.x3[i] = pa;
  }
  for (int i = 0; i < 2; ++i) {  // round 2: c1 = 0
    const __m256i pb = _mm256_mul_epu32(S.x2[i], mb), pa = _mm256_mul_epu32(S.x0[i], ma);
    S.x0[i] = _mm256_xor_si256(_mm256_srli_epi64(pb, 32), K.k0[1]);
    S.x2[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), S.x3[i]), K.k1[1]);
    S.x1[i] = pb;
    S.x3[i] = pa;
  }
}

// Rounds r0 + 1 .. r1 (1-based) of philox4x32_10.
FD_AVX2 void philox_rounds8(PhiloxState8& S, const PhiloxKeys8& K, int r0, int r1) {
  const __m256i ma = _mm256_set1_epi64x(0xD2511F53), mb = _mm256_set1_epi64x(0xCD9E8D57);
  for (int r = r0; r < r1; ++r)
    for (int i = 0; i < 2; ++i) {
      const __m256i pb = _mm256_mul_epu32(S.x2[i], mb), pa = _mm256_mul_epu32(S.x0[i], ma);
      S.x0[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), S.x1[i]), K.k0[r]);
      S.x2[i] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), S.x3[i]), K.k1[r]);
      S.x1[i] = pb;
      S.x3[i] = pa;
    }
}

FD_AVX2 __m256i pack_lo8(__m256i a, __m256i b) {  // low halves of a's and b's 64-bit lanes
  return _mm256_castps_si256(
      _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), 0x88));
}

// Box-Muller stage 1 on two pairs (ua: log input, ub: angle input): fd_logf's range reduction
// m (mantissa - 1), z = m^2 and the exponent fe of max(u, 1e-7); the angle t = 2 pi u.
FD_AVX2 void bm_reduce(const __m256i (&ua)[2], const __m256i (&ub)[2], __m256 (&m)[2],
                       __m256 (&z)[2], __m256 (&fe)[2], __m256 (&t)[2]) {
  for (int i = 0; i < 2; ++i) {
    const __m256i b = _mm256_max_epi32(_mm256_castps_si256(uniform8(ua[i])), FD_PI(0x33d6bf95));
    const __m256i e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 23), FD_PI(0xff)),
                                       FD_PI(126));
    const __m256i mb = _mm256_or_si256(_mm256_and_si256(b, FD_PI(0x007fffff)), FD_PI(0x3f000000));
    const __m256i small = _mm256_cmpgt_epi32(FD_PI(0x3f3504f3), mb);  // m < sqrt(1/2) (bits)
    const __m256 mm = _mm256_castsi256_ps(mb);
    fe[i] = _mm256_cvtepi32_ps(_mm256_add_epi32(e, small));
    m[i] = _mm256_sub_ps(_mm256_add_ps(mm, _mm256_and_ps(_mm256_castsi256_ps(small), mm)),
                         FD_PS(1.0f));
    z[i] = _mm256_mul_ps(m[i], m[i]);
    t[i] = _mm256_mul_ps(FD_PS(6.283185307179586f), uniform8(ub[i]));
  }
}

// Stage 2: -2 log(u) (fd_logf with every constant times -2).
FD_AVX2 void bm_log(const __m256 (&m)[2], const __m256 (&z)[2], const __m256 (&fe)[2],
                    __m256 (&r2)[2]) {
  for (int i = 0; i < 2; ++i) {
    const __m256 mi = m[i], zi = z[i], z2 = _mm256_mul_ps(zi, zi), z4 = _mm256_mul_ps(z2, z2);
    // p(m) = c0 m^8 + c1 m^7 + ... + c8 (times -2)
    const __m256 p78 =
        _mm256_fmadd_ps(FD_PS(2 * 2.4999993993e-1f), mi, FD_PS(-2 * 3.3333331174e-1f));
    const __m256 p56 =
        _mm256_fmadd_ps(FD_PS(2 * 1.6668057665e-1f), mi, FD_PS(-2 * 2.0000714765e-1f));
    const __m256 p34 =
        _mm256_fmadd_ps(FD_PS(2 * 1.2420140846e-1f), mi, FD_PS(-2 * 1.4249322787e-1f));
    const __m256 p12 =
        _mm256_fmadd_ps(FD_PS(2 * 1.1514610310e-1f), mi, FD_PS(-2 * 1.1676998740e-1f));
    const __m256 p58 = _mm256_fmadd_ps(p56, zi, p78);
    const __m256 p14 = _mm256_fmadd_ps(p12, zi, p34);
    const __m256 p18 = _mm256_fmadd_ps(p14, z2, p58);
    const __m256 poly = _mm256_fmadd_ps(FD_PS(-2 * 7.0376836292e-2f), z4, p18);
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(poly, mi), zi);
    y = _mm256_fmadd_ps(FD_PS(2 * 2.12194440e-4f), fe[i], y);
    y = _mm256_add_ps(zi, y);  // -2 (-0.5 z)
    r2[i] = _mm256_fmadd_ps(FD_PS(-2 * 0.693359375f), fe[i], _mm256_fmadd_ps(FD_PS(-2.0f), mi, y));
  }
}

// Stage 3: (n0, n1) = sqrt(r2) (cos t, sin t) (fd_sincos_small for 0 <= t < 8).
FD_AVX2 void bm_polar(const __m256 (&t)[2], const __m256 (&r2)[2], __m256 (&n0)[2],
                      __m256 (&n1)[2]) {
  for (int i = 0; i < 2; ++i) {
    const __m256i q = _mm256_cvttps_epi32(
        _mm256_fmadd_ps(t[i], FD_PS(0.636619772367581343f), FD_PS(0.5f)));
    const __m256 fq = _mm256_cvtepi32_ps(q);
    __m256 r = _mm256_fnmadd_ps(fq, FD_PS(1.5703125f), t[i]);
    r = _mm256_fnmadd_ps(fq, FD_PS(4.837512969970703125e-4f), r);
    r = _mm256_fnmadd_ps(fq, FD_PS(7.54978995489188216e-8f), r);
    const __m256 z = _mm256_mul_ps(r, r);
    const __m256 ps = _mm256_fmadd_ps(
        _mm256_fmadd_ps(FD_PS(-1.9515295891e-4f), z, FD_PS(8.3321608736e-3f)), z,
        FD_PS(-1.6666654611e-1f));
    const __m256i s = _mm256_castps_si256(_mm256_fmadd_ps(_mm256_mul_ps(r, z), ps, r));
    const __m256 pc = _mm256_fmadd_ps(
        _mm256_fmadd_ps(FD_PS(2.443315711809948e-5f), z, FD_PS(-1.388731625493765e-3f)), z,
        FD_PS(4.166664568298827e-2f));
    const __m256i c = _mm256_castps_si256(
        _mm256_fmadd_ps(_mm256_mul_ps(z, z), pc, _mm256_fnmadd_ps(FD_PS(0.5f), z, FD_PS(1.0f))));
    // quadrant q mod 4: cos = (c, -s, -c, s), sin = (s, c, -s, -c): odd q swaps s and c
    // (x ^ ((s ^ c) & odd)), then bit 1 of q + 1 (cos) and of q (sin) is the sign
    const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(q, FD_PI(1)), FD_PI(1));
    const __m256i sw = _mm256_and_si256(_mm256_xor_si256(s, c), odd);
    const __m256i sign = FD_PI(0x80000000u);
    const __m256i cneg =
        _mm256_and_si256(_mm256_slli_epi32(_mm256_add_epi32(q, FD_PI(1)), 30), sign);
    const __m256i sneg = _mm256_and_si256(_mm256_slli_epi32(q, 30), sign);
    const __m256 cs = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_xor_si256(c, sw), cneg));
    const __m256 sn = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_xor_si256(s, sw), sneg));
    const __m256 rr = _mm256_sqrt_ps(r2[i]);
    n0[i] = _mm256_mul_ps(rr, cs);
    n1[i] = _mm256_mul_ps(rr, sn);
  }
}

// out[4j + l] = nl[j] for the 8 counters j of one group, 32 floats; the lanes of a, b, c, d hold
// counters (0, 2, 4, 6 | 1, 3, 5, 7), so a 4x4 transpose within each 128-bit half is enough.
FD_AVX2 void store_interleaved8(float* out, __m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab0 = _mm256_unpacklo_ps(a, b), ab1 = _mm256_unpackhi_ps(a, b);  // a0 b0 a1 b1
  const __m256 cd0 = _mm256_unpacklo_ps(c, d), cd1 = _mm256_unpackhi_ps(c, d);
  const __m256 q0 = _mm256_shuffle_ps(ab0, cd0, 0x44), q1 = _mm256_shuffle_ps(ab0, cd0, 0xEE);
  const __m256 q2 = _mm256_shuffle_ps(ab1, cd1, 0x44), q3 = _mm256_shuffle_ps(ab1, cd1, 0xEE);
  // q0 = counters (0 | 1), q1 = (2 | 3), q2 = (4 | 5), q3 = (6 | 7)
  _mm256_storeu_ps(out, q0);
  _mm256_storeu_ps(out + 8, q1);
  _mm256_storeu_ps(out + 16, q2);
  _mm256_storeu_ps(out + 24, q3);
}

// The 32 normals of the 8 counters whose Philox is done in S, into out; with NEXT, S meanwhile
// runs all ten rounds of the counters next_ctr + [0, 8) (the split points measured best).
template <bool NEXT>
FD_AVX2 void normals_step8(float* out, PhiloxState8& S, uint64_t next_ctr, const PhiloxKeys8& K) {
  const __m256i ua[2] = {pack_lo8(S.x0[0], S.x0[1]), pack_lo8(S.x2[0], S.x2[1])};
  const __m256i ub[2] = {pack_lo8(S.x1[0], S.x1[1]), pack_lo8(S.x3[0], S.x3[1])};
  __m256 m[2], z[2], fe[2], t[2], r2[2], n0[2], n1[2];
  if (NEXT) philox_start8(S, next_ctr, K);
  bm_reduce(ua, ub, m, z, fe, t);
  if (NEXT) philox_rounds8(S, K, 2, 5);
  bm_log(m, z, fe, r2);
  if (NEXT) philox_rounds8(S, K, 5, 8);
  bm_polar(t, r2, n0, n1);
  store_interleaved8(out, n0[0], n1[0], n0[1], n1[1]);
  if (NEXT) philox_rounds8(S, K, 8, 10);
}

// out[0, 4 n) = the normals of counters ctr + [0, n), interleaved (element order).
__attribute__((target("avx2,fma"))) void gen_normals_avx2(float* __restrict out, uint64_t ctr,
                                                          int64_t n, uint32_t key0,
                                                          uint32_t key1) {
  if (n <= 0) return;
  PhiloxKeys8 K;
  philox_keys8(K, key0, key1);
  PhiloxState8 S;
  philox_start8(S, ctr, K);
  philox_rounds8(S, K, 2, 10);
  int64_t k = 0;
  for (; k + 16 <= n; k += 8) normals_step8<true>(out + 4 * k, S, ctr + (uint64_t)k + 8, K);
  if (k + 8 <= n) {  // the last whole group, then at most a partial one
    normals_step8<false>(out + 4 * k, S, 0, K);
    k += 8;
    if (k == n) return;
    philox_start8(S, ctr + (uint64_t)k, K);
    philox_rounds8(S, K, 2, 10);
  }
  alignas(32) float t[32];
  normals_step8<false>(t, S, 0, K);
  std::memcpy(out + 4 * k, t, (size_t)(n - k) * 4 * sizeof(float));
}
#undef FD_PS
#undef FD_PI
#endif

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
// can alias them. MASK: a term whose coefficient is exactly 0 is absent (formed_operand); false
// is the plain loop, run when every formed term's coefficient is non-zero. CLIP: opt.clip (-1,
// the plain loops: GCC unswitches it) or fixed (0 / 1, the masked loops: the masks' extra
// instructions put them past GCC's unswitching limit, and the loop with the runtime clip select
// did not vectorise: 6x slower).
template <int PRED, bool RECOMP, bool X0, bool MASK, int CLIP>
inline __attribute__((always_inline)) void tile_math_t(
    const StepOptions& opt, const float* cf, int64_t len, const float* __restrict xb,
    const float* __restrict mb, const float* __restrict up, const float* __restrict sp,
    const float* __restrict zp, const float* __restrict qp, float* __restrict ob,
    float* __restrict x0b) {
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

template <bool RECOMP, bool X0, bool MASK, int CLIP>
inline __attribute__((always_inline)) void tile_math_p(int pred, const StepOptions& opt,
                                                       const float* cf, int64_t len,
                                                       const float* xb, const float* mb,
                                                       const float* up, const float* sp,
                                                       const float* zp, const float* qp,
                                                       float* ob, float* x0b) {
  switch (pred) {
    case kEpsilon:
      return tile_math_t<kEpsilon, RECOMP, X0, MASK, CLIP>(opt, cf, len, xb, mb, up, sp, zp, qp,
                                                           ob, x0b);
    case kVPrediction:
      return tile_math_t<kVPrediction, RECOMP, X0, MASK, CLIP>(opt, cf, len, xb, mb, up, sp, zp,
                                                               qp, ob, x0b);
    default:
      return tile_math_t<kSample, RECOMP, X0, MASK, CLIP>(opt, cf, len, xb, mb, up, sp, zp, qp,
                                                          ob, x0b);
  }
}

#define FD_TILE_ARGS pred, opt, cf, len, xb, mb, up, sp, zp, qp, ob, x0b

// MASK false: the plain loops (opt.clip at run time, GCC unswitches it); true: the masked loops,
// with the clip fixed at compile time (see tile_math_t).
template <bool RECOMP, bool X0, bool MASK>
inline __attribute__((always_inline)) void tile_math_c(int pred, const StepOptions& opt,
                                                       const float* cf, int64_t len,
                                                       const float* xb, const float* mb,
                                                       const float* up, const float* sp,
                                                       const float* zp, const float* qp,
                                                       float* ob, float* x0b) {
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

using TileMathFn = void (*)(int, const StepOptions&, const float*, int64_t, const float*,
                            const float*, const float*, const float*, const float*,
                            const float*, float*, float*);

// One function per MASK: the masked loops are separate code, so the plain function is the same
// size as before them (in one function, the plain DDIM loop lost ~50%: GCC's per-function
// budgets).
template <bool MASK>
void tile_math_base(int pred, const StepOptions& opt, const float* cf, int64_t len,
                    const float* xb, const float* mb, const float* up, const float* sp,
                    const float* zp, const float* qp, float* ob, float* x0b) {
  FD_TILE_MATH_BODY
}

// AVX2+FMA clone: GCC contracts a * b + c into FMAs here (C++ default -ffp-contract=fast, as
// nvcc does on the GPU), which halves the arithmetic of the loop (it bounded the step in cache);
// the baseline (SSE2) clone rounds each product separately, so the two clones can differ in the
// last bit. Chosen once per process, so results are reproducible on one machine.
#if FD_X86_DISPATCH
template <bool MASK>
__attribute__((target("avx2,fma"))) void tile_math_avx2(
    int pred, const StepOptions& opt, const float* cf, int64_t len, const float* xb,
    const float* mb, const float* up, const float* sp, const float* zp, const float* qp,
    float* ob, float* x0b) {
  FD_TILE_MATH_BODY
}
#endif
#undef FD_TILE_MATH_BODY
#undef FD_TILE_ARGS

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
                 uint64_t offset, uint32_t key0, uint32_t key1) {
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
  const StepOptions o = A.opt;
  const float* cp = reinterpret_cast<const float*>(A.coef);
  float coefs[8];
  for (int k = 0; k < 8; ++k) coefs[k] = cp[k];
  const float k2 = coefs[2], k3 = coefs[3], k4 = coefs[4];
  const float k5 = coefs[5], k6 = coefs[6], k7 = coefs[7];
  // A term whose coefficient is exactly 0 is absent (formed_operand); the coefficients are host
  // memory here, so the masked loops run only for a step where a formed term's coefficient is 0
  // (DDIM's c_x, DDPM's c_eps, LCM's c_eps after clip_sample); a learned variance's per-element
  // sigma is checked per tile below.
  const bool lv = o.learned_var != 0;
  const bool zero_coef =
      o.mode == 0 ? (k2 == 0.0f || k3 == 0.0f || k4 == 0.0f || (o.has_z && !lv && k5 == 0.0f))
                  : (k2 == 0.0f || k3 == 0.0f || (o.has_z && k4 == 0.0f) ||
                     (o.has_prev2 && k6 == 0.0f) || (o.has_noise && k5 == 0.0f));
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
  const TX* W = reinterpret_cast<const TX*>(A.w);
  const TX* Q = reinterpret_cast<const TX*>(A.q);
  TX* Out = reinterpret_cast<TX*>(A.out);
  TX* X0 = reinterpret_cast<TX*>(A.x0);
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
    alignas(64) float qb[kTile];
    const float* xp = tile_in(X + n * A.bs_x + i0, len, xb);
    const float* mp = tile_in(Mc + n * A.bs_m + i0, len, mb);
    const float* up = mp;
    const float* sp = mp;
    const float* zp = mp;
    if (o.cfg) up = tile_in(Mu + n * A.bs_mu + i0, len, ub);
    bool mask = zero_coef;
    if (lv) {  // sigma per element (expf: its own loop so the main loop vectorises)
      load_tile(V + n * A.bs_v + i0, len, vb);
      bool zero_sigma = false;
      for (int64_t j = 0; j < len; ++j) {
        vb[j] = learned_sigma(k5, vb[j], k6, k7);
        zero_sigma |= vb[j] == 0.0f;
      }
      mask = mask || (o.has_z && zero_sigma);
      sp = vb;
    }
    if (Z) {
      zp = tile_in(Z + n * A.bs_z + i0, len, zb);
    } else if (philox && o.mode == 0) {
      philox_tile(zb, A, n, M, i0, len, offset, key0, key1);
      zp = zb;
    }
    if (o.mode == 1 && o.has_noise) {  // the SDE noise goes in the (unused) variance slot
      if (W) {
        sp = tile_in(W + n * A.bs_w + i0, len, vb);
      } else {
        philox_tile(vb, A, n, M, i0, len, offset, key0, key1);
        sp = vb;
      }
    }
    const float* qp = mp;
    if (Q) qp = tile_in(Q + n * A.bs_q + i0, len, qb);  // 3M: x0_prev2
    // fp32 outputs are written in place; other dtypes go through the fp32 tiles
    float* op = tile_out(Out + n * M + i0, ob);
    float* x0p = X0 ? tile_out(X0 + n * M + i0, x0b) : nullptr;
    (mask ? tile_masked : tile_plain)(PRED, o, coefs, len, xp, mp, up, sp, zp, qp, op, x0p);
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
  check_arg(!A.opt.has_noise || (A.opt.mode == 1 && (A.w || A.gen)),
            "sampler_step: has_noise needs mode 1 and a noise operand or generator state");
  check_arg(!A.opt.has_prev2 == !A.q && (!A.q || (A.opt.mode == 1 && A.z)),
            "sampler_step: x0_prev2 needs mode 1 and x0_prev");
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
