// CUDA kernel of the fused sampler update / DPM-Solver++ 2M step.
//
// One thread handles chunks of kVec = 8 consecutive elements of one sample (16-byte vector loads
// and stores when every operand is aligned, scalar otherwise), grid-stride over all chunks with
// int64 indices and a capped grid. fp32 math from sampler_math.h, Philox noise from philox.h.
// Runs on the caller's stream (torch's current stream); coef and the Philox state are read on the
// device, so the launch is CUDA-graph capturable and never synchronises with the host.
#include <cstdint>  // before cuda_utils.cuh, which uses uintptr_t (nvcc 13 + g++ 13 need it)

#include "fastdiff/cuda_io.cuh"
#include "fastdiff/cuda_utils.cuh"
#include "fastdiff/philox.h"
#include "fastdiff/sampler_math.h"
#include "fastdiff/sampler_step_cuda.h"

namespace fastdiff {
namespace {

constexpr int kVec = 8;
constexpr int kThreads = 256;

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
                                             int64_t j0, const PhiloxState& rng) {
  const uint64_t offset = rng.offset;
  const uint32_t key0 = rng.key0, key1 = rng.key1;
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
  const PhiloxState rng = philox_state(A.gen);
  const StepOperands<TX, TM> P(A);
  // coef[8] / coef[9] exist (are read) only with x0_prev3 / x0_prev4; an absent term: 0
  const float k8 = PREV3 ? __ldg(cp + 8) : 0.0f;
  const float k9 = PREV3 && P.q4 ? __ldg(cp + 9) : 0.0f;
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
    load_chunk(P.x + n * A.bs_x + j0, xv, cnt, full);
    load_chunk(P.m + n * A.bs_m + j0, mv, cnt, full);
    if (o.cfg) load_chunk(P.mu + n * A.bs_mu + j0, uv, cnt, full);
    if (o.learned_var) load_chunk(P.v + n * A.bs_v + j0, vv, cnt, full);
    if (P.z) load_chunk(P.z + n * A.bs_z + j0, zv, cnt, full);
    else if (philox && o.mode == 0) philox_chunk(zv, A, n, M, j0, rng);
    if (o.has_noise) {  // dpm (SDE variant): noise from w or Philox
      if (P.w) load_chunk(P.w + n * A.bs_w + j0, wv, cnt, full);
      else philox_chunk(wv, A, n, M, j0, rng);
    }
    float qv[PREV2 ? kVec : 1];
    if (PREV2) load_chunk(P.q + n * A.bs_q + j0, qv, cnt, full);
    float q3v[PREV3 ? kVec : 1], q4v[PREV3 ? kVec : 1];
    if (PREV3) {
      load_chunk(P.q3 + n * A.bs_q3 + j0, q3v, cnt, full);
      if (P.q4) {
        load_chunk(P.q4 + n * A.bs_q4 + j0, q4v, cnt, full);
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
    store_chunk(P.out + n * M + j0, ov, cnt, full);
    if (P.x0) store_chunk(P.x0 + n * M + j0, x0v, cnt, full);
  }
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
  const unsigned int grid = grid_stride_blocks(A.n * ((A.inner + kVec - 1) / kVec), kThreads);
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
  if (!check_step_args(A)) return;
  FASTDIFF_DISPATCH_HOST_DTYPES(A.dtype_x, A.dtype_m, "sampler_step",
                                [&] { launch<TX, TM>(A, as_stream(stream)); });
}

}  // namespace fastdiff
