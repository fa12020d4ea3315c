// Fused GroupNorm(+add, +scale/shift)+SiLU on CUDA, NCHW and NHWC, fp32/fp16/bf16 storage, fp32
// math. Per-element and per-group arithmetic comes from fastdiff/group_norm_math.h (shared with
// the CPU kernel).
//
// Plans (chosen on the host, see make_plan):
//  * fused (NCHW and NHWC): one block per (n, g) when the slab (C/G x HW) fits in registers:
//    one HBM read; exact shifted two-pass mean/variance on chip; per-channel a, b in shared
//    memory; y = act(a*x + b). 16-byte vector accesses along HW (NCHW) or along the group's
//    channels (NHWC) when they tile evenly, scalar accesses otherwise.
//  * split (NCHW and NHWC): (1) per-channel shifted partial sums over spatial chunks, many blocks
//    (rows of HW for NCHW; tiles of whole C-rows, vectorised along C, for NHWC), (2) one block
//    per (n, g) merges them (Chan et al.) and folds everything into per-(n, c) a, b, (3) an
//    elementwise pass y = act(a*x + b) (the second read of x mostly hits L2).
// All offsets are int64; every grid uses only grid.x (< 2^31 blocks).
#include <algorithm>
#include <cstdint>

#include "fastdiff/cuda_io.cuh"  // to_f / from_f
#include "fastdiff/cuda_utils.cuh"
#include "fastdiff/group_norm_cuda.h"
#include "fastdiff/group_norm_math.h"

namespace fastdiff {
namespace {

constexpr int kFusedThreads = 512;
constexpr int kFusedMaxVecs = 4;  // vectors per thread held in registers by the fused kernel
constexpr int kThreads = 256;
constexpr int kMaxSplit = 64;

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// V consecutive elements, one aligned access (16 bytes when V = 16 / sizeof(T)).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_f(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_f(pk.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_f(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = from_f<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Sum of a float2 over the block (blockDim.x a multiple of 32, <= 1024); result to all threads.
__device__ __forceinline__ float2 block_sum2(float2 v) {
  __shared__ float2 scratch[32];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int nw = (blockDim.x + 31) >> 5;
    v = lane < nw ? scratch[lane] : make_float2(0.f, 0.f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
      v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
    }
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

// Element i of an fp32 / fp16 / bf16 operand, as fp32 (exact: fp16 and bf16 widen exactly).
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == 2) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// weight/bias [C] (dtype wb_dt), add/scale/shift rows (dtype cond_dt, row strides *_rs).
struct DevParams {
  const void *w, *b, *add, *scale, *shift;
  int wb_dt, cond_dt;
  int64_t add_rs, scale_rs, shift_rs;
  float eps;
  bool silu;
  __device__ __forceinline__ float add_at(int64_t n, int64_t c) const {
    return add ? load_any(add, cond_dt, n * add_rs + c) : 0.0f;
  }
  __device__ __forceinline__ void fold(int64_t n, int64_t c, float mean, float rstd, float* a,
                                       float* bb) const {
    gn::fold(mean, rstd, w ? load_any(w, wb_dt, c) : 1.0f, b ? load_any(b, wb_dt, c) : 0.0f,
             add_at(n, c), scale ? load_any(scale, cond_dt, n * scale_rs + c) : 0.0f,
             shift ? load_any(shift, cond_dt, n * shift_rs + c) : 0.0f, a, bb);
  }
};

// ---------------------------------------------------------------------------------- fused
// One block per (n, g): the slab x[n, g*cpg:(g+1)*cpg, :] is held in registers,
// kFusedMaxVecs vectors of V per thread. NCHW: the slab is contiguous (cpg*HW), vectors run
// along HW (needs HW % V == 0). NHWC: HW strips of cpg contiguous channels, vectors run along C
// (needs cpg % V == 0).
template <typename T, int V, bool NHWC>
__global__ void __launch_bounds__(kFusedThreads)
    gn_fused_kernel(const T* __restrict__ x,  // [N x C x HW] (NCHW) or [N x HW x C] (NHWC) input
                    T* __restrict__ y,        // same shape and layout as x: output
                    int64_t C,                // channels
                    int64_t HW,               // spatial positions per channel
                    int64_t G,                // groups (C % G == 0)
                    DevParams p) {            // weight/bias, add/scale/shift rows, eps, silu
  extern __shared__ float sm[];  // [3 * cpg]: add, a, b of the group's channels
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / G, g = ng % G;
  const int64_t cpg = C / G;
  const int64_t c0 = g * cpg;
  const int64_t base = NHWC ? n * HW * C + c0 : (n * C + c0) * HW;
  const int64_t nvec = cpg * HW / V;
  const int64_t hwv = HW / V;    // NCHW: vectors per channel row
  const int64_t cpv = cpg / V;   // NHWC: vectors per spatial position
  float* s_add = sm;
  float* s_a = sm + cpg;
  float* s_b = sm + 2 * cpg;
  for (int64_t cl = threadIdx.x; cl < cpg; cl += blockDim.x)
    s_add[cl] = p.add_at(n, c0 + cl);
  __syncthreads();
  // element (vector vi, lane j) -> global offset and channel within the group
  auto off_of = [&](int64_t vi) -> int64_t {
    return NHWC ? base + (vi / cpv) * C + (vi % cpv) * V : base + vi * V;
  };
  auto chan_of = [&](int64_t vi, int j) -> int64_t {
    return NHWC ? (vi % cpv) * V + j : vi / hwv;
  };

  float r[kFusedMaxVecs][V];
  // Shift k = u at the slab's first element: exact for constant groups, no cancellation.
  const float k = to_f(x[base]) + s_add[0];
  float2 acc = make_float2(0.f, 0.f);
#pragma unroll
  for (int i = 0; i < kFusedMaxVecs; ++i) {
    const int64_t vi = threadIdx.x + (int64_t)i * kFusedThreads;
    if (vi < nvec) {
      load_f<T, V>(x + off_of(vi), r[i]);
#pragma unroll
      for (int j = 0; j < V; ++j) acc.x += r[i][j] + s_add[chan_of(vi, j)] - k;
    }
  }
  const float cnt = (float)(cpg * HW);
  const float mean = k + block_sum2(acc).x / cnt;
  acc = make_float2(0.f, 0.f);
#pragma unroll
  for (int i = 0; i < kFusedMaxVecs; ++i) {
    const int64_t vi = threadIdx.x + (int64_t)i * kFusedThreads;
    if (vi < nvec) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = r[i][j] + s_add[chan_of(vi, j)] - mean;
        acc.x += d * d;
      }
    }
  }
  const float var = block_sum2(acc).x / cnt;
  const float rstd = gn::rstd_from(var, p.eps);
  for (int64_t cl = threadIdx.x; cl < cpg; cl += blockDim.x)
    p.fold(n, c0 + cl, mean, rstd, &s_a[cl], &s_b[cl]);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kFusedMaxVecs; ++i) {
    const int64_t vi = threadIdx.x + (int64_t)i * kFusedThreads;
    if (vi < nvec) {
      float o[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t cl = chan_of(vi, j);
        o[j] = gn::apply_act(r[i][j], s_a[cl], s_b[cl], p.silu);
      }
      store_f<T, V>(y + off_of(vi), o);
    }
  }
}

// ------------------------------------------------------------------ split: partial statistics
// NCHW: block b -> row (n, c) = b / split, chunk b % split of `chunk` spatial positions.
// Writes s1 = sum(x - k_c), s2 = sum((x - k_c)^2) with k_c = x[n, c, 0].
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_row_stats_kernel(const T* __restrict__ x,  // [N*C x HW] NCHW input
                        float* __restrict__ S1,   // [N*C x split] shifted sums (out)
                        float* __restrict__ S2,   // [N*C x split] shifted squared sums (out)
                        int64_t HW,               // spatial positions per row
                        int64_t split,            // chunks per row
                        int64_t chunk) {          // positions per chunk
  const int64_t row = blockIdx.x / split, sp = blockIdx.x % split;
  const T* xr = x + row * HW;
  const float k = to_f(xr[0]);
  const int64_t s0 = sp * chunk, s1 = imin(HW, s0 + chunk);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t s = s0 + (int64_t)threadIdx.x * V; s < s1; s += (int64_t)kThreads * V) {
    float v[V];
    load_f<T, V>(xr + s, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = v[j] - k;
      acc.x += d;
      acc.y += d * d;
    }
  }
  acc = block_sum2(acc);
  if (threadIdx.x == 0) {
    S1[row * split + sp] = acc.x;
    S2[row * split + sp] = acc.y;
  }
}

// NHWC: block b -> (n, channel tile ct, row chunk sp). The tile holds cvt <= kThreads channel
// vectors; thread t owns vector t % cvt and rows t / cvt, t / cvt + ry, ... (ry = kThreads / cvt),
// so every row of the tile is read as contiguous 16-byte vectors along C.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_chan_stats_kernel(const T* __restrict__ x,  // [N x HW x C] NHWC input
                         float* __restrict__ S1,   // [N*C x split] shifted sums (out)
                         float* __restrict__ S2,   // [N*C x split] shifted squared sums (out)
                         int64_t C,                // channels (C % V == 0)
                         int64_t HW,               // spatial positions
                         int64_t n_ct,             // channel tiles per sample
                         int64_t split,            // row chunks per (n, tile)
                         int64_t chunk) {          // rows per chunk
  __shared__ float sh1[kThreads * V];
  __shared__ float sh2[kThreads * V];
  const int64_t b = blockIdx.x;
  const int64_t sp = b % split, ct = (b / split) % n_ct, n = b / (split * n_ct);
  const int64_t cv_total = C / V;
  const int64_t cv0 = ct * kThreads;
  const int cvt = (int)imin(kThreads, cv_total - cv0);
  const int ry = kThreads / cvt;
  const int t = threadIdx.x;
  const int my_cv = t % cvt, my_r = t / cvt;
  const bool active = my_r < ry;
  const int64_t c = (cv0 + my_cv) * V;
  const T* xn = x + n * HW * C;
  float k[V], a1[V], a2[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a1[j] = a2[j] = 0.0f;
  if (active) {
    load_f<T, V>(xn + c, k);
    const int64_t r0 = sp * chunk, r1 = imin(HW, r0 + chunk);
    for (int64_t r = r0 + my_r; r < r1; r += ry) {
      float v[V];
      load_f<T, V>(xn + r * C + c, v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = v[j] - k[j];
        a1[j] += d;
        a2[j] += d * d;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    sh1[t * V + j] = a1[j];
    sh2[t * V + j] = a2[j];
  }
  __syncthreads();
  if (my_r == 0) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float s1 = 0.f, s2 = 0.f;
      for (int q = 0; q < ry; ++q) {
        s1 += sh1[(q * cvt + my_cv) * V + j];
        s2 += sh2[(q * cvt + my_cv) * V + j];
      }
      S1[(n * C + c + j) * split + sp] = s1;
      S2[(n * C + c + j) * split + sp] = s2;
    }
  }
}

// ------------------------------------------------------------------------- split: finalize
// One block per (n, g): merge the channels' partial sums (Chan et al.; equal counts) into the
// group mean / M2 and fold into A[n, c], B[n, c]. Channel statistics are recomputed from the
// partials in each pass rather than stored, so any C/G fits.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_finalize_kernel(const T* __restrict__ x,         // input (its first element per row: k_c)
                       const float* __restrict__ S1,    // [N*C x split] shifted sums
                       const float* __restrict__ S2,    // [N*C x split] shifted squared sums
                       float* __restrict__ A,           // [N x C] folded scale a (out)
                       float* __restrict__ B,           // [N x C] folded offset b (out)
                       int64_t C,                       // channels
                       int64_t HW,                      // spatial positions per channel
                       int64_t G,                       // groups
                       int64_t split,                   // partials per channel
                       bool nhwc,                       // x is [N x HW x C]
                       DevParams p) {                   // weight/bias, add/scale/shift, eps
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / G, g = ng % G;
  const int64_t cpg = C / G, c0 = g * cpg;
  const float m = (float)HW;
  auto chan = [&](int64_t c, float* mean_c, float* m2_c) {
    float s1 = 0.f, s2 = 0.f;
    for (int64_t q = 0; q < split; ++q) {
      s1 += S1[(n * C + c) * split + q];
      s2 += S2[(n * C + c) * split + q];
    }
    const float k = to_f(x[nhwc ? n * HW * C + c : (n * C + c) * HW]);
    gn::shifted_to_moments<float>(k, s1, s2, m, mean_c, m2_c);
    *mean_c += p.add_at(n, c);
  };
  // Group mean relative to the first channel's mean: exact when all channel means agree.
  float kg, unused;
  chan(c0, &kg, &unused);
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t cl = threadIdx.x; cl < cpg; cl += blockDim.x) {
    float mc, m2c;
    chan(c0 + cl, &mc, &m2c);
    acc.x += mc - kg;
    acc.y += m2c;
  }
  acc = block_sum2(acc);
  const float mean = kg + acc.x / (float)cpg;
  const float m2_within = acc.y;
  acc = make_float2(0.f, 0.f);
  for (int64_t cl = threadIdx.x; cl < cpg; cl += blockDim.x) {
    float mc, m2c;
    chan(c0 + cl, &mc, &m2c);
    acc.x += (mc - mean) * (mc - mean);
  }
  acc = block_sum2(acc);
  const float var = (m2_within + m * acc.x) / (m * (float)cpg);
  const float rstd = gn::rstd_from(var, p.eps);
  for (int64_t cl = threadIdx.x; cl < cpg; cl += blockDim.x)
    p.fold(n, c0 + cl, mean, rstd, &A[n * C + c0 + cl], &B[n * C + c0 + cl]);
}

// ---------------------------------------------------------------------------- split: apply
// NCHW: block b -> row (n, c) = b / parts, part b % parts of kThreads * 4 vectors.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_apply_nchw_kernel(const T* __restrict__ x,      // [N*C x HW] NCHW input
                         T* __restrict__ y,            // [N*C x HW] output
                         const float* __restrict__ A,  // [N*C] folded scale
                         const float* __restrict__ B,  // [N*C] folded offset
                         int64_t HW,                   // spatial positions per row
                         int64_t parts,                // blocks per row
                         bool silu) {                  // y = silu(a x + b), else a x + b
  const int64_t row = blockIdx.x / parts, part = blockIdx.x % parts;
  const float a = A[row], b = B[row];
  const int64_t per = (int64_t)kThreads * 4 * V;
  const int64_t s0 = part * per, s1 = imin(HW, s0 + per);
  const T* xr = x + row * HW;
  T* yr = y + row * HW;
  for (int64_t s = s0 + (int64_t)threadIdx.x * V; s < s1; s += (int64_t)kThreads * V) {
    float v[V];
    load_f<T, V>(xr + s, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = gn::apply_act(v[j], a, b, silu);
    store_f<T, V>(yr + s, v);
  }
}

// NHWC: block b -> (n, row chunk) of `rows` rows x C; thread loop over (row, channel vector).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_apply_nhwc_kernel(const T* __restrict__ x,      // [N x HW x C] NHWC input
                         T* __restrict__ y,            // [N x HW x C] output
                         const float* __restrict__ A,  // [N x C] folded scale
                         const float* __restrict__ B,  // [N x C] folded offset
                         int64_t C,                    // channels (C % V == 0)
                         int64_t HW,                   // spatial positions
                         int64_t rows,                 // rows per block
                         int64_t n_rb,                 // row blocks per sample
                         bool silu) {                  // y = silu(a x + b), else a x + b
  const int64_t n = blockIdx.x / n_rb, rb = blockIdx.x % n_rb;
  const int64_t r0 = rb * rows, r1 = imin(HW, r0 + rows);
  const int64_t cv = C / V;
  const int64_t total = (r1 - r0) * cv;
  const float* An = A + n * C;
  const float* Bn = B + n * C;
  for (int64_t j = threadIdx.x; j < total; j += kThreads) {
    const int64_t r = r0 + j / cv, c = (j % cv) * V;
    const int64_t off = (n * HW + r) * C + c;
    float v[V];
    load_f<T, V>(x + off, v);
#pragma unroll
    for (int q = 0; q < V; ++q) v[q] = gn::apply_act(v[q], An[c + q], Bn[c + q], silu);
    store_f<T, V>(y + off, v);
  }
}

// ------------------------------------------------------------------------------------ host
struct Plan {
  bool fused;
  int vec;         // elements per access (16 / sizeof(T) or 1)
  int64_t split;   // spatial chunks in the stats pass
  int64_t chunk;   // spatial positions per chunk
  int64_t n_ct;    // NHWC channel tiles
  int64_t ws;      // fp32 workspace elements
};

int elem_size(int dtype) { return to_dtype(dtype) == DType::Float32 ? 4 : 2; }

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Plan make_plan(const GroupNormArgs& a) {
  Plan pl{};
  const int full = 16 / elem_size(a.dtype);
  const bool aligned = a.x % 16 == 0 && a.y % 16 == 0;
  const int64_t cpg = a.C / a.G;
  // Fused: vectors along HW (NCHW) or along the group's channels (NHWC).
  const int64_t fused_inner = a.nhwc ? cpg : a.HW;
  const int fvec = (aligned && fused_inner % full == 0) ? full : 1;
  pl.fused = cpg * a.HW / fvec <= (int64_t)kFusedThreads * kFusedMaxVecs &&
             3 * cpg * 4 <= 40 * 1024;
  if (pl.fused) {
    pl.vec = fvec;
    return pl;
  }
  const int64_t inner = a.nhwc ? a.C : a.HW;  // contiguous run the vectors must tile
  pl.vec = (aligned && inner % full == 0) ? full : 1;
  if (a.nhwc) {
    const int64_t cv = a.C / pl.vec;
    pl.n_ct = cdiv(cv, kThreads);
    const int64_t want = cdiv(1024, a.N * pl.n_ct);  // aim for ~1024 blocks
    pl.split = std::max<int64_t>(1, std::min<int64_t>({kMaxSplit, want, cdiv(a.HW, 8)}));
    pl.chunk = cdiv(a.HW, pl.split);
    pl.split = cdiv(a.HW, pl.chunk);
  } else {
    pl.n_ct = 1;
    const int64_t want = cdiv(1024, a.N * a.C);
    const int64_t by_size = cdiv(a.HW, (int64_t)kThreads * pl.vec * 2);
    pl.split = std::max<int64_t>(1, std::min<int64_t>({kMaxSplit, want, by_size}));
    pl.chunk = cdiv(cdiv(a.HW, pl.split), pl.vec) * pl.vec;
    pl.split = cdiv(a.HW, pl.chunk);
  }
  pl.ws = a.N * a.C * (2 * pl.split + 2);
  return pl;
}

template <typename T, int V>
void launch(const GroupNormArgs& a, const Plan& pl, cudaStream_t st) {
  const T* x = reinterpret_cast<const T*>(a.x);
  T* y = reinterpret_cast<T*>(a.y);
  auto ptr = [](uintptr_t v) { return reinterpret_cast<const void*>(v); };
  auto rows = [&](int64_t rs) { return rs < 0 ? a.C : rs; };
  const DevParams p{ptr(a.weight),     ptr(a.bias),         ptr(a.add),         ptr(a.scale),
                    ptr(a.shift),      a.wb_dtype,          a.cond_dtype,       rows(a.add_rs),
                    rows(a.scale_rs),  rows(a.shift_rs),    a.eps,              a.silu};
  const int64_t cpg = a.C / a.G;
  if (pl.fused) {
    const size_t smem = 3 * cpg * sizeof(float);
    if (a.nhwc)
      gn_fused_kernel<T, V, true><<<clamp_grid_x(a.N * a.G), kFusedThreads, smem, st>>>(
          x, y, a.C, a.HW, a.G, p);
    else
      gn_fused_kernel<T, V, false><<<clamp_grid_x(a.N * a.G), kFusedThreads, smem, st>>>(
          x, y, a.C, a.HW, a.G, p);
    check_launch("gn_fused_kernel");
    return;
  }
  check_arg(a.workspace != 0 && a.workspace_floats >= pl.ws,
            "group_norm_silu_cuda: workspace too small for the split plan");
  float* S1 = reinterpret_cast<float*>(a.workspace);
  float* S2 = S1 + a.N * a.C * pl.split;
  float* A = S2 + a.N * a.C * pl.split;
  float* B = A + a.N * a.C;
  if (a.nhwc) {
    gn_chan_stats_kernel<T, V><<<clamp_grid_x(a.N * pl.n_ct * pl.split), kThreads, 0, st>>>(
        x, S1, S2, a.C, a.HW, pl.n_ct, pl.split, pl.chunk);
    check_launch("gn_chan_stats_kernel");
  } else {
    gn_row_stats_kernel<T, V><<<clamp_grid_x(a.N * a.C * pl.split), kThreads, 0, st>>>(
        x, S1, S2, a.HW, pl.split, pl.chunk);
    check_launch("gn_row_stats_kernel");
  }
  gn_finalize_kernel<T><<<clamp_grid_x(a.N * a.G), kThreads, 0, st>>>(
      x, S1, S2, A, B, a.C, a.HW, a.G, pl.split, a.nhwc, p);
  check_launch("gn_finalize_kernel");
  if (a.nhwc) {
    const int64_t cv = a.C / V;
    const int64_t rows = std::max<int64_t>(1, (int64_t)kThreads * 4 / cv);
    const int64_t n_rb = cdiv(a.HW, rows);
    gn_apply_nhwc_kernel<T, V><<<clamp_grid_x(a.N * n_rb), kThreads, 0, st>>>(
        x, y, A, B, a.C, a.HW, rows, n_rb, a.silu);
    check_launch("gn_apply_nhwc_kernel");
  } else {
    const int64_t parts = cdiv(a.HW, (int64_t)kThreads * 4 * V);
    gn_apply_nchw_kernel<T, V><<<clamp_grid_x(a.N * a.C * parts), kThreads, 0, st>>>(
        x, y, A, B, a.HW, parts, a.silu);
    check_launch("gn_apply_nchw_kernel");
  }
}

template <typename T>
void run(const GroupNormArgs& a, cudaStream_t st) {
  const Plan pl = make_plan(a);
  constexpr int kFull = 16 / sizeof(T);
  if (pl.vec == kFull)
    launch<T, kFull>(a, pl, st);
  else
    launch<T, 1>(a, pl, st);
}

}  // namespace

int64_t group_norm_silu_cuda_workspace(const GroupNormArgs& a) { return make_plan(a).ws; }

void group_norm_silu_cuda(const GroupNormArgs& a, uintptr_t stream) {
  // Grids are 1-D over grid.x; their products must stay below 2^31 blocks.
  check_arg(a.N * a.C * kMaxSplit < (int64_t)2147483647, "group_norm_silu_cuda: too many rows");
  for (int dt : {a.wb_dtype, a.cond_dtype})
    check_arg(dt >= 0 && dt <= 2, "group_norm_silu_cuda: operands must be fp32, fp16 or bf16");
  for (int64_t rs : {a.add_rs, a.scale_rs, a.shift_rs})
    check_arg(rs >= -1, "group_norm_silu_cuda: negative row stride");
  cudaStream_t st = as_stream(stream);
  switch (to_dtype(a.dtype)) {
    case DType::Float32: run<float>(a, st); break;
    case DType::Float16: run<__half>(a, st); break;
    case DType::BFloat16: run<__nv_bfloat16>(a, st); break;
    default: throw std::invalid_argument("fastdiff: group_norm_silu_cuda: unsupported dtype");
  }
}

}  // namespace fastdiff
