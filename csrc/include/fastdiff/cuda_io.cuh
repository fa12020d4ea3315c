// Device-side fp32 <-> fp16 / bf16 conversions and element I/O, shared by the .cu kernels: one
// set of intrinsics per 16-bit type (Dev16), the element functions GroupNorm uses (to_f /
// from_f), the operand loads / stores of the sampler and UniPC kernels (DevIO), the 32-bit pairs
// of the attention kernel's mma operands. Loads widen exactly; stores round to nearest even.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "fastdiff/common.h"

namespace fastdiff {

// The intrinsics of one 16-bit device type T (__half or __nv_bfloat16): from its bits, to / from
// fp32, and the same for a pair (two consecutive elements in one 32-bit word).
template <typename T>
struct Dev16;

template <>
struct Dev16<__half> {
  using pair = __half2;
  __device__ static __forceinline__ __half from_bits(unsigned short u) {
    return __ushort_as_half(u);
  }
  __device__ static __forceinline__ float to_f(__half v) { return __half2float(v); }
  __device__ static __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
  __device__ static __forceinline__ float2 to_f2(pair v) { return __half22float2(v); }
  __device__ static __forceinline__ pair from_f2(float lo, float hi) {
    return __floats2half2_rn(lo, hi);
  }
};

template <>
struct Dev16<__nv_bfloat16> {
  using pair = __nv_bfloat162;
  __device__ static __forceinline__ __nv_bfloat16 from_bits(unsigned short u) {
    return __ushort_as_bfloat16(u);
  }
  __device__ static __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __forceinline__ __nv_bfloat16 from_f(float v) {
    return __float2bfloat16_rn(v);
  }
  __device__ static __forceinline__ float2 to_f2(pair v) { return __bfloat1622float2(v); }
  __device__ static __forceinline__ pair from_f2(float lo, float hi) {
    return __floats2bfloat162_rn(lo, hi);
  }
};

// One element of a device type (float, __half, __nv_bfloat16) as fp32, and back.
__device__ __forceinline__ float to_f(float v) { return v; }
template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return Dev16<T>::to_f(v);
}
template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return Dev16<T>::from_f(v);
}
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}

// The device type of a host storage type (common.h's Half16 / BF16 are __half / __nv_bfloat16).
template <typename T>
struct DevType;
template <>
struct DevType<Half16> {
  using type = __half;
};
template <>
struct DevType<BF16> {
  using type = __nv_bfloat16;
};

// A kernel operand of host storage type T (float, Half16, BF16) as fp32: load / store one
// element (loads through the read-only cache), load8 / store8 eight consecutive elements as one
// 16-byte access (p 16-byte aligned).
template <typename T>
struct DevIO {  // Half16, BF16
  using D = Dev16<typename DevType<T>::type>;
  using Pair = typename D::pair;
  __device__ static float load(const T* p) {
    return D::to_f(D::from_bits(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ static void store(T* p, float v) {
    *reinterpret_cast<typename DevType<T>::type*>(p) = D::from_f(v);
  }
  __device__ static void load8(const T* p, float* o) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const Pair* h = reinterpret_cast<const Pair*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = D::to_f2(h[k]);
      o[2 * k] = f.x;
      o[2 * k + 1] = f.y;
    }
  }
  __device__ static void store8(T* p, const float* v) {
    uint4 r;
    Pair* h = reinterpret_cast<Pair*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = D::from_f2(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = r;
  }
};

template <>
struct DevIO<float> {
  __device__ static float load(const float* p) { return __ldg(p); }
  __device__ static void store(float* p, float v) { *p = v; }
  __device__ static void load8(const float* p, float* o) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
  }
  __device__ static void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

}  // namespace fastdiff
