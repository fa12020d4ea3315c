// CUDA kernel of the fused sampler update / DPM-Solver++ 2M step.
//
// One thread handles chunks of kVec = 8 consecutive elements of one sample (16-byte vector loads
// and stores when every operand is aligned, scalar otherwise), grid-stride over all chunks with
// int64 indices and a capped grid. fp32 math from sampler_math.h, Philox noise from philox.h.
// Runs on the caller's stream (torch's current stream); coef and the Philox state are read on the
// device, so the launch is CUDA-graph capturable and never synchronises with the host.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>  // before cuda_utils.cuh, which uses uintptr_t (nvcc 13 + g++ 13 need it)

#include "fastdiff/cuda_utils.cuh"
#include "fastdiff/philox.h"
#include "fastdiff/sampler_math.h"
#include "fastdiff/sampler_step_cuda.h"

namespace fastdiff {
namespace {

constexpr int kVec = 8;
constexpr int kThreads = 256;

template <typename T>
struct DevIO;

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

template <>
struct DevIO<Half16> {
  __device__ static float load(const Half16* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ static void store(Half16* p, float v) {
    *reinterpret_cast<__half*>(p) = __float2half_rn(v);
  }
  __device__ static void load8(const Half16* p, float* o) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      o[2 * k] = f.x;
      o[2 * k + 1] = f.y;
    }
  }
  __device__ static void store8(Half16* p, const float* v) {
    uint4 r;
    __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = r;
  }
};

template <>
struct DevIO<BF16> {
  __device__ static float load(const BF16* p) {
    return __bfloat162float(
        __ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  __device__ static void store(BF16* p, float v) {
    *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(v);
  }
  __device__ static void load8(const BF16* p, float* o) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(h[k]);
      o[2 * k] = f.x;
      o[2 * k + 1] = f.y;
    }
  }
  __device__ static void store8(BF16* p, const float* v) {
    uint4 r;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = r;
  }
};

template <typename T>
__device__ __forceinline__ void load_chunk(const T* p, float* o, int cnt, bool full) {
  if (full) {
    DevIO<T>::load8(p, o);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) o[k] = k < cnt ? DevIO<T>::load(p + k) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const float* v, int cnt, bool full) {
  if (full) {
    DevIO<T>::store8(p, v);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (k < cnt) DevIO<T>::store(p + k, v[k]);
  }
}

// zv[0, kVec) = the Philox noise of sample n's memory elements [j0, j0 + kVec): logical element
// e is lane e % 4 of counter offset + e / 4 (past the sample's end: never stored).
__device__ __forceinline__ void philox_chunk(float* zv, const StepArgs& A, int64_t n, int64_t M,
                                             int64_t j0, uint64_t offset, uint32_t key0,
                                             uint32_t key1) {
  const uint64_t base = (uint64_t)(n * M);
  if (A.nhwc_c == 0 && M % 4 == 0) {  // chunk = 2 whole counters
    const uint64_t c = offset + ((base + (uint64_t)j0) >> 2);
#pragma unroll
    for (int q = 0; q < kVec / 4; ++q) {
      const uint64_t cq = c + (uint64_t)q;
      philox_randn4(key0, key1, (uint32_t)cq, (uint32_t)(cq >> 32), zv[4 * q], zv[4 * q + 1],
                    zv[4 * q + 2], zv[4 * q + 3]);
    }
  } else if (A.nhwc_c > 0) {  // memory index hw * C + c -> logical c * HW + hw
    int64_t hw = j0 / A.nhwc_c, c = j0 - hw * A.nhwc_c;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint64_t e = base + (uint64_t)(c * A.hw + hw);
      zv[k] = philox_randn_lane(key0, key1, offset + (e >> 2), (int)(e & 3u));
      if (++c == A.nhwc_c) {
        c = 0;
        ++hw;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint64_t e = base + (uint64_t)(j0 + k);
      zv[k] = philox_randn_lane(key0, key1, offset + (e >> 2), (int)(e & 3u));
    }
  }
}

// PREV2: the DPM++ 3M step (x0_prev2 in A.q); false compiles the sampler / 2M kernel as before.
// PREV3 (with PREV2): x0_prev3 in A.q3 (coef[8]) and, when A.q4 is set, x0_prev4 (coef[9]).
template <typename TX, typename TM, int PRED, bool PREV2, bool PREV3>
__global__ void __launch_bounds__(kThreads)
    sampler_step_kernel(const StepArgs A, const bool vec_ok) {
  const StepOptions o = A.opt;
  const float* cp = reinterpret_cast<const float*>(A.coef);
  const float a = __ldg(cp + 0), s = __ldg(cp + 1), k2 = __ldg(cp + 2), k3 = __ldg(cp + 3),
              k4 = __ldg(cp + 4), k5 = __ldg(cp + 5), k6 = __ldg(cp + 6), k7 = __ldg(cp + 7);
  const bool philox = A.gen != 0;
  uint32_t key0 = 0, key1 = 0;
  uint64_t offset = 0;
  if (philox) {
    const long long* gp = reinterpret_cast<const long long*>(A.gen);
    const uint64_t seed = (uint64_t)__ldg(gp);
    key0 = (uint32_t)seed;
    key1 = (uint32_t)(seed >> 32);
    offset = (uint64_t)__ldg(gp + 1);
  }
  const TX* X = reinterpret_cast<const TX*>(A.x);
  const TM* Mc = reinterpret_cast<const TM*>(A.m);
  const TM* Mu = reinterpret_cast<const TM*>(A.mu);
  const TM* V = reinterpret_cast<const TM*>(A.v);
  const TX* Z = reinterpret_cast<const TX*>(A.z);
  const TX* W = reinterpret_cast<const TX*>(A.w);
  const TX* Q = reinterpret_cast<const TX*>(A.q);
  const TX* Q3 = reinterpret_cast<const TX*>(A.q3);
  const TX* Q4 = reinterpret_cast<const TX*>(A.q4);
  // coef[8] / coef[9] exist (are read) only with x0_prev3 / x0_prev4; an absent term: 0
  const float k8 = PREV3 ? __ldg(cp + 8) : 0.0f;
  const float k9 = PREV3 && Q4 ? __ldg(cp + 9) : 0.0f;
  TX* Out = reinterpret_cast<TX*>(A.out);
  TX* X0 = reinterpret_cast<TX*>(A.x0);
  const int64_t M = A.inner;
  const int64_t chunks = (M + kVec - 1) / kVec;
  const int64_t total = A.n * chunks;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t gi = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; gi < total; gi += stride) {
    const int64_t n = gi / chunks;
    const int64_t j0 = (gi - n * chunks) * kVec;
    const int cnt = (int)min((int64_t)kVec, M - j0);
    const bool full = vec_ok && cnt == kVec;
    float xv[kVec], mv[kVec], uv[kVec], vv[kVec], zv[kVec], wv[kVec], ov[kVec], x0v[kVec];
    load_chunk(X + n * A.bs_x + j0, xv, cnt, full);
    load_chunk(Mc + n * A.bs_m + j0, mv, cnt, full);
    if (o.cfg) load_chunk(Mu + n * A.bs_mu + j0, uv, cnt, full);
    if (o.learned_var) load_chunk(V + n * A.bs_v + j0, vv, cnt, full);
    if (Z) load_chunk(Z + n * A.bs_z + j0, zv, cnt, full);
    else if (philox && o.mode == 0) philox_chunk(zv, A, n, M, j0, offset, key0, key1);
    if (o.has_noise) {  // dpm (SDE variant): noise from W or Philox
      if (W) load_chunk(W + n * A.bs_w + j0, wv, cnt, full);
      else philox_chunk(wv, A, n, M, j0, offset, key0, key1);
    }
    float qv[PREV2 ? kVec : 1];
    if (PREV2) load_chunk(Q + n * A.bs_q + j0, qv, cnt, full);
    float q3v[PREV3 ? kVec : 1], q4v[PREV3 ? kVec : 1];
    if (PREV3) {
      load_chunk(Q3 + n * A.bs_q3 + j0, q3v, cnt, full);
      if (Q4) {
        load_chunk(Q4 + n * A.bs_q4 + j0, q4v, cnt, full);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) q4v[k] = 0.0f;  // c_prev4 = 0: not formed
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float m = o.cfg ? cfg_combine(mv[k], uv[k], o.g) : mv[k];
      float x0, eps;
      if (o.mode == 0) {
        predict_x0_eps<PRED>(xv[k], m, a, s, o.clip, o.clip_r, o.recompute, true, x0, eps);
        const float sigma = o.learned_var ? learned_sigma(k5, vv[k], k6, k7) : k5;
        ov[k] = sampler_update<true>(k2, k3, k4, xv[k], x0, eps, o.has_z, sigma, zv[k]);
      } else {
        // eps of the (clipped) x0 for the c_eps = coef[7] term: divides (a sample model, a
        // clipped x0) only where the term is formed
        const bool want_eps = k7 != 0.0f;
        predict_x0_eps<PRED>(xv[k], m, a, s, o.clip, o.clip_r, want_eps, want_eps, x0, eps);
        float v;
        if (PREV3)
          v = dpm_hist_update<true>(k2, k3, k4, k6, k8, k9, xv[k], x0, zv[k], qv[PREV2 ? k : 0],
                                    q3v[k], q4v[k], o.has_noise ? k5 : 0.0f,
                                    o.has_noise ? wv[k] : 0.0f);
        else if (PREV2)
          v = dpm3m_update<true>(k2, k3, k4, k6, xv[k], x0, zv[k], qv[PREV2 ? k : 0],
                                 o.has_noise, k5, wv[k]);
        else
          v = o.has_noise
                  ? dpm2m_sde_update<true>(k2, k3, k4, xv[k], x0, o.has_z, zv[k], k5, wv[k])
                  : dpm2m_update<true>(k2, k3, k4, xv[k], x0, o.has_z, zv[k]);
        ov[k] = with_eps_term<true>(v, k7, eps);
      }
      x0v[k] = x0;
    }
    store_chunk(Out + n * M + j0, ov, cnt, full);
    if (X0) store_chunk(X0 + n * M + j0, x0v, cnt, full);
  }
}

int sm_count() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

bool aligned16(uintptr_t p) { return (p & 15u) == 0; }

template <typename TX, typename TM, bool PREV2, bool PREV3>
void launch_pred(const StepArgs& A, unsigned int grid, bool vec_ok, cudaStream_t stream) {
  switch (A.opt.pred) {
    case kEpsilon:
      sampler_step_kernel<TX, TM, kEpsilon, PREV2, PREV3>
          <<<grid, kThreads, 0, stream>>>(A, vec_ok);
      break;
    case kVPrediction:
      sampler_step_kernel<TX, TM, kVPrediction, PREV2, PREV3>
          <<<grid, kThreads, 0, stream>>>(A, vec_ok);
      break;
    default:
      sampler_step_kernel<TX, TM, kSample, PREV2, PREV3>
          <<<grid, kThreads, 0, stream>>>(A, vec_ok);
      break;
  }
}

template <typename TX, typename TM>
void launch(const StepArgs& A, cudaStream_t stream) {
  bool vec_ok = A.inner % kVec == 0;
  const uintptr_t ptrs[] = {A.x, A.m, A.mu, A.v, A.z, A.w, A.q, A.q3, A.q4, A.out, A.x0};
  for (uintptr_t p : ptrs) vec_ok = vec_ok && (p == 0 || aligned16(p));
  const int64_t strides[] = {A.bs_x, A.bs_m,  A.bs_mu, A.bs_v, A.bs_z, A.bs_w, A.q ? A.bs_q : 0,
                             A.q3 ? A.bs_q3 : 0, A.q4 ? A.bs_q4 : 0};
  for (int64_t s : strides) vec_ok = vec_ok && (s % kVec == 0);
  const int64_t chunks = (A.inner + kVec - 1) / kVec;
  const int64_t blocks_needed = (A.n * chunks + kThreads - 1) / kThreads;
  const int64_t cap = (int64_t)sm_count() * 16;  // grid-stride beyond this
  const unsigned int grid = clamp_grid_x(blocks_needed < cap ? blocks_needed : cap);
  if (A.opt.has_prev3) {
    launch_pred<TX, TM, true, true>(A, grid, vec_ok, stream);
  } else if (A.opt.has_prev2) {
    launch_pred<TX, TM, true, false>(A, grid, vec_ok, stream);
  } else {
    launch_pred<TX, TM, false, false>(A, grid, vec_ok, stream);
  }
  check_launch("sampler_step_kernel");
}

}  // namespace

void sampler_step_cuda(const StepArgs& A, uintptr_t stream) {
  check_arg(A.n >= 0 && A.inner >= 0, "sampler_step: negative size");
  check_arg(A.x && A.m && A.coef && A.out, "sampler_step: null operand");
  check_arg(!A.opt.cfg || A.mu, "sampler_step: cfg needs the uncond operand");
  check_arg(!A.opt.learned_var || A.v, "sampler_step: learned_var needs the variance operand");
  check_arg(A.opt.pred >= 0 && A.opt.pred <= 2, "sampler_step: unknown prediction type");
  check_arg(!A.opt.has_noise || (A.opt.mode == 1 && (A.w || A.gen)),
            "sampler_step: has_noise needs mode 1 and a noise operand or generator state");
  check_arg(!A.opt.has_prev2 == !A.q && (!A.q || (A.opt.mode == 1 && A.z)),
            "sampler_step: x0_prev2 needs mode 1 and x0_prev");
  check_arg(!A.opt.has_prev3 == !A.q3 && (!A.q3 || A.q),
            "sampler_step: x0_prev3 needs x0_prev2 (mode 1, x0_prev)");
  check_arg(!A.opt.has_prev4 == !A.q4 && (!A.q4 || A.q3),
            "sampler_step: x0_prev4 needs x0_prev3");
  if (A.n == 0 || A.inner == 0) return;
  FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_x, "sampler_step", [&] {
    using TX = scalar_t;
    FASTDIFF_DISPATCH_HOST_DTYPE(A.dtype_m, "sampler_step", [&] {
      using TM = scalar_t;
      launch<TX, TM>(A, as_stream(stream));
    });
  });
}

}  // namespace fastdiff
