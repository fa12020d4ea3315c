// Shared definitions for every fastdiff kernel (CPU and CUDA).
//
// The C++ boundary: entry points take raw addresses (uintptr_t), element counts, int64 strides,
// a DType code and (for CUDA) a stream handle. Nothing here includes or links libtorch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

// Per-element helpers for hot loops: forced inline on the host so GCC's vectoriser sees
// straight-line code (a call in an `omp simd` loop stops vectorisation).
#if defined(__CUDACC__)
#define FD_HD_INLINE FD_HD
#else
#define FD_HD_INLINE inline __attribute__((always_inline))
#endif

// Version of the Python <-> fastdiff._C calling convention (argument lists of the entry points).
// Bump it with every signature change, together with ABI_VERSION in fastdiff/_ext.py: a module
// built from older sources is then refused at import with "stale build" instead of failing
// later with a pybind11 TypeError about incompatible arguments.
#define FASTDIFF_ABI_VERSION 2

namespace fastdiff {

// The bits of a float as uint32 and back (no aliasing UB: memcpy on the host).
FD_HD_INLINE uint32_t fd_float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

FD_HD_INLINE float fd_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Must match fastdiff/_ext.py DTYPE_CODES.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

inline DType to_dtype(int code) {
  if (code < 0 || code > 3) throw std::invalid_argument("fastdiff: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

inline void check_arg(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("fastdiff: " + msg);
}

// ---- host-side fp16 / bf16 <-> fp32 conversions (bit exact, round-to-nearest-even) ----
inline float half_bits_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      man &= 0x3ffu;
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to inf
  if (absx < 0x38800000u) {                                    // subnormal or zero in half
    if (absx < 0x33000000u) return (uint16_t)sign;
    uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) ... shift into half subnormal position
    uint32_t hm = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (hm & 1u))) ++hm;
    return (uint16_t)(sign | hm);
  }
  uint32_t h = ((absx >> 13) - (112u << 10));
  uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)(sign | h);
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);  // quiet nan
  uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)((x + rounding) >> 16);
}

// Load/store one element of a given storage type as fp32 (CPU side).
template <typename T> struct HostIO;
template <> struct HostIO<float> {
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float v) { *p = v; }
};
struct Half16 { uint16_t bits; };
struct BF16 { uint16_t bits; };
template <> struct HostIO<Half16> {
  static inline float load(const Half16* p) { return half_bits_to_float(p->bits); }
  static inline void store(Half16* p, float v) { p->bits = float_to_half_bits(v); }
};
template <> struct HostIO<BF16> {
  static inline float load(const BF16* p) { return bf16_bits_to_float(p->bits); }
  static inline void store(BF16* p, float v) { p->bits = float_to_bf16_bits(v); }
};

// Dispatch a functor templated on storage type: fn.template operator()<T>().
#define FASTDIFF_DISPATCH_HOST_DTYPE(code, NAME, ...)                                      \
  [&] {                                                                                    \
    switch (::fastdiff::to_dtype(code)) {                                                  \
      case ::fastdiff::DType::Float32: { using scalar_t = float; return __VA_ARGS__(); }   \
      case ::fastdiff::DType::Float16: { using scalar_t = ::fastdiff::Half16; return __VA_ARGS__(); } \
      case ::fastdiff::DType::BFloat16: { using scalar_t = ::fastdiff::BF16; return __VA_ARGS__(); } \
      default: throw std::invalid_argument(std::string("fastdiff: ") + NAME + ": unsupported dtype"); \
    }                                                                                      \
  }()

// The two-operand dispatch of the sampler kernels: x's storage type as TX, the model output's as
// TM (each fp32, fp16 or bf16), then __VA_ARGS__() with both in scope.
#define FASTDIFF_DISPATCH_HOST_DTYPES(code_x, code_m, NAME, ...)                  \
  FASTDIFF_DISPATCH_HOST_DTYPE(code_x, NAME, [&] {                                \
    using TX = scalar_t;                                                          \
    FASTDIFF_DISPATCH_HOST_DTYPE(code_m, NAME, [&] {                              \
      using TM = scalar_t;                                                        \
      return __VA_ARGS__();                                                       \
    });                                                                           \
  })

}  // namespace fastdiff
