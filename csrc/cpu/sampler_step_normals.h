// Normal draws of the CPU sampler_step kernel (csrc/cpu/sampler_step.cpp, its only includer,
// after its #pragma GCC optimize): the baseline planar Philox + Box-Muller loop and the AVX2+FMA
// software-pipelined generator. Internal (anonymous namespace), split out to keep the kernel
// file small.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastdiff/cpu_isa.h"
#if FD_X86_DISPATCH
#include <immintrin.h>
#endif

#include "fastdiff/philox.h"

namespace fastdiff {
namespace {

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

}  // namespace
}  // namespace fastdiff
