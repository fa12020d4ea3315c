// Host-side staging of kernel operands through fp32 tiles, shared by the CPU kernels
// (csrc/cpu/*.cpp): their math loops run over plain floats; fp32 storage is read and written in
// place, fp16 / bf16 storage converted into (and out of) a caller's fp32 buffer (common.h HostIO:
// exact widening, round to nearest even on stores).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "fastdiff/common.h"

namespace fastdiff {

// n elements at p as floats: p itself for fp32 storage, else converted into buf.
template <typename T>
inline const float* as_f32(const T* p, int64_t n, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    (void)n;
    (void)buf;
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = HostIO<T>::load(p + i);
    return buf;
  }
}

// Where to write float results for p: p itself for fp32 storage, else buf (then flush_f32).
template <typename T>
inline float* out_f32(T* p, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    (void)buf;
    return p;
  } else {
    (void)p;
    return buf;
  }
}

// Stores the n results out_f32 staged in v (fp16 / bf16 storage; fp32 was written in place).
template <typename T>
inline void flush_f32(T* p, const float* v, int64_t n) {
  if constexpr (!std::is_same<T, float>::value) {
    for (int64_t i = 0; i < n; ++i) HostIO<T>::store(p + i, v[i]);
  } else {
    (void)p;
    (void)v;
    (void)n;
  }
}

// dst[0, n) = the n elements at p as floats: always a copy (a buffer the caller then changes or
// passes on with other staged operands).
template <typename T>
inline void load_f32(const T* p, int64_t n, float* dst) {
  if constexpr (std::is_same<T, float>::value) {
    std::memcpy(dst, p, (size_t)n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = HostIO<T>::load(p + i);
  }
}

// p[0, n) = src converted to T: always a copy.
template <typename T>
inline void store_f32(T* p, int64_t n, const float* src) {
  if constexpr (std::is_same<T, float>::value) {
    std::memcpy(p, src, (size_t)n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) HostIO<T>::store(p + i, src[i]);
  }
}

}  // namespace fastdiff
