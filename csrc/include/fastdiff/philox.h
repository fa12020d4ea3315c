// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) and the Box-Muller normals of Triton's `tl.randn4x(seed, counter)`, bit for bit in the
// uint32 stream:
//   key      = (seed & 0xffffffff, seed >> 32)             (64-bit seed split lo/hi)
//   counter  = (ctr & 0xffffffff, ctr >> 32, 0, 0)         (64-bit counter)
//   uniform  = u as int32, negative -> ~u, times 4.6566127342e-10f      ([0, 1))
//   normals  = Box-Muller on (u0, u1) and (u2, u3): r = sqrt(-2 log(max(u_even, 1e-7))),
//              th = 6.283185307179586f * u_odd, (r cos th, r sin th) -> 4 normals per counter.
// The noise of the sampler step uses all four: logical element e takes lane e % 4 of counter
// offset + e / 4. log, sin and cos are our own fp32 polynomials (Cephes-style, ~1-2 ulp) so the
// CPU loop vectorises and the CPU and CUDA builds compute identical values; Triton's
// libdevice/numpy results agree to float rounding.
#pragma once

#include <cstdint>
#include <cstring>

#include "fastdiff/common.h"

// Host: force inlining so the caller's `omp simd` loop vectorises the whole generator.
#if defined(__CUDACC__)
#define FD_PHILOX FD_HD
#define FD_UNROLL _Pragma("unroll")
#else
#define FD_PHILOX inline __attribute__((always_inline))
#define FD_UNROLL _Pragma("GCC unroll 10")
#endif

namespace fastdiff {

// Philox4x32 with 10 rounds, in place on the counter (c0..c3) with key (k0, k1).
FD_PHILOX void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                         uint32_t k1) {
  FD_UNROLL
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = (uint64_t)0xCD9E8D57u * (uint64_t)c2;
    const uint64_t pa = (uint64_t)0xD2511F53u * (uint64_t)c0;
    const uint32_t n0 = (uint32_t)(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = (uint32_t)(pa >> 32) ^ c3 ^ k1;
    c1 = (uint32_t)pb;
    c3 = (uint32_t)pa;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// Triton's uint_to_uniform_float for 32-bit values.
FD_PHILOX float philox_uniform(uint32_t u) {
  int32_t i = (int32_t)u;
  i ^= i >> 31;  // negative -> ~i (branch free)
  return (float)i * 4.6566127342e-10f;
}

// Natural log for normal positive floats (Cephes logf polynomial).
FD_PHILOX float fd_logf(float x) {
  const uint32_t ix = fd_float_bits(x);
  int e = (int)((ix >> 23) & 0xffu) - 126;                 // x = m * 2^e, m in [0.5, 1)
  float m = fd_bits_float((ix & 0x007fffffu) | 0x3f000000u);
  const int small = m < 0.707106781186547524f;  // then use 2m - 1 and e - 1 (branch free)
  e -= small;
  m = (m + (float)small * m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = (float)e;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  float r = m + y;
  r += 0.693359375f * fe;
  return r;
}

// sin(t) and cos(t) for 0 <= t < 8 (Cephes sinf/cosf polynomials, 3-part Cody-Waite reduction
// by pi/2), branch free.
FD_PHILOX void fd_sincos_small(float t, float& sn, float& cs) {
  const int q = (int)(t * 0.636619772367581343f + 0.5f);  // nearest multiple of pi/2 (t >= 0)
  const float fq = (float)q;
  float r = ((t - fq * 1.5703125f) - fq * 4.837512969970703125e-4f) - fq * 7.54978995489188216e-8f;
  const float z = r * r;
  const float s = r + r * z * ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f);
  const float c = 1.0f - 0.5f * z +
                  z * z * ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z +
                           4.166664568298827e-2f);
  // quadrant k = q mod 4: cos = (c, -s, -c, s), sin = (s, c, -s, -c) (bit selects)
  const uint32_t odd = 0u - (uint32_t)(q & 1);
  const uint32_t cneg = (uint32_t)(((q + 1) >> 1) & 1) << 31;
  const uint32_t sneg = (uint32_t)((q >> 1) & 1) << 31;
  const uint32_t sb = fd_float_bits(s), cb = fd_float_bits(c);
  cs = fd_bits_float(((sb & odd) | (cb & ~odd)) ^ cneg);
  sn = fd_bits_float(((cb & odd) | (sb & ~odd)) ^ sneg);
}

// sqrt(x) for x >= 0. CUDA: sqrtf. Host: rsqrt bit estimate + 3 Newton steps (a few ulp), since
// libm sqrtf keeps a branch to set errno that blocks vectorisation without -fno-math-errno.
FD_PHILOX float fd_sqrtf(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  float y = fd_bits_float(0x5f375a86u - (fd_float_bits(x) >> 1));
  const float h = 0.5f * x;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return x * y;
#endif
}

// Box-Muller on one pair of uniform bits (Triton pair_uniform_to_normal).
FD_PHILOX void philox_box_muller(uint32_t ua, uint32_t ub, float& n0, float& n1) {
  // u = max(u, 1e-7f), as an int max on the bits (u >= 0), which keeps the loop vectorisable
  int32_t b = (int32_t)fd_float_bits(philox_uniform(ua));
  const int32_t lo = 0x33d6bf95;  // bits of 1e-7f
  b = b > lo ? b : lo;
  const float r = fd_sqrtf(-2.0f * fd_logf(fd_bits_float((uint32_t)b)));
  float sn, cs;
  fd_sincos_small(6.283185307179586f * philox_uniform(ub), sn, cs);
  n0 = r * cs;
  n1 = r * sn;
}

// Four N(0, 1) for the 64-bit counter (ctr_hi:ctr_lo) under key (k0, k1): Triton tl.randn4x.
FD_PHILOX void philox_randn4(uint32_t k0, uint32_t k1, uint32_t ctr_lo, uint32_t ctr_hi,
                             float& n0, float& n1, float& n2, float& n3) {
  uint32_t c0 = ctr_lo, c1 = ctr_hi, c2 = 0u, c3 = 0u;
  philox4x32_10(c0, c1, c2, c3, k0, k1);
  philox_box_muller(c0, c1, n0, n1);
  philox_box_muller(c2, c3, n2, n3);
}

// Lane `lane` (0..3) of philox_randn4 for the 64-bit counter `ctr` (odd-size/scattered paths).
FD_PHILOX float philox_randn_lane(uint32_t k0, uint32_t k1, uint64_t ctr, int lane) {
  float n0, n1, n2, n3;
  philox_randn4(k0, k1, (uint32_t)ctr, (uint32_t)(ctr >> 32), n0, n1, n2, n3);
  return lane == 0 ? n0 : lane == 1 ? n1 : lane == 2 ? n2 : n3;
}

// The key and counter offset of the in-kernel noise from gen = int64[2] (seed, offset) in the
// kernel's memory (read through the read-only cache on the device); all 0 without one (gen 0).
struct PhiloxState {
  uint32_t key0 = 0, key1 = 0;
  uint64_t offset = 0;
};
FD_HD PhiloxState philox_state(uintptr_t gen) {
  PhiloxState st;
  if (gen) {
    const long long* g = reinterpret_cast<const long long*>(gen);
#if defined(__CUDA_ARCH__)
    const uint64_t seed = (uint64_t)__ldg(g);
    st.offset = (uint64_t)__ldg(g + 1);
#else
    const uint64_t seed = (uint64_t)g[0];
    st.offset = (uint64_t)g[1];
#endif
    st.key0 = (uint32_t)seed;
    st.key1 = (uint32_t)(seed >> 32);
  }
  return st;
}

}  // namespace fastdiff
