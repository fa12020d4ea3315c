// Fused attention forward (non-causal), flash-style: FlashAttention-2 loop order (Dao 2023),
// online softmax in log2 units (fastdiff/attention_math.h), O(L) memory.
//
// fp16/bf16: tensor cores through mma.sync.m16n8k16 (inline PTX), fp32 accumulators.
//   One CTA = 4 warps = a 64-query tile of one (batch, head); each warp owns 16 query rows and
//   keeps its Q fragments, its S = Q K^T tile and its O accumulator in registers. K/V tiles of 64
//   keys are staged in shared memory. P is re-packed from the S accumulator registers straight
//   into the A operand of the P V mma (no shared-memory round trip). Head dims that are not a
//   multiple of 16 (40) pad only the QK^T contraction to 48; P V runs on exact n=8 tiles (40 = 5x8).
// fp32: a simple CUDA-core path, one thread per query row, K/V tiles in shared memory, no TF32.
//
// Grid: x = B*H (up to 2^31-1), y = query tiles (<= 65535). All offsets are int64.
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastdiff/attention_cuda.h"
#include "fastdiff/attention_math.h"
#include "fastdiff/common.h"
#include "fastdiff/cuda_io.cuh"  // Dev16: the fp16 / bf16 pairs
#include "fastdiff/cuda_utils.cuh"

namespace fastdiff {
namespace {

constexpr int kWarps = 4;
constexpr int kBM = 16 * kWarps;  // query rows per CTA
constexpr int kBN = 64;           // keys per tile
constexpr int kPad = 8;           // smem row padding (elements): conflict-free fragment reads

// ---- mma.sync wrappers -------------------------------------------------------------------------
// d += a b for fp16 (T = __half) or bf16 (T = __nv_bfloat16) operands, fp32 accumulators; pack:
// two fp32 values as one 32-bit pair of T (round to nearest even), the A / output fragments.
#define FD_MMA_M16N8K16(AB)                                                                       \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0,%1,%2,%3}, "          \
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                          \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
struct Mma {
  static constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
#if defined(FASTDIFF_CUDA_EMU)  // tests/cuda_emu: the PTX semantics, run on the CPU
    fd_emu::mma_m16n8k16(d, a, b0, b1, kBf16);
#else
    if constexpr (kBf16) {
      FD_MMA_M16N8K16("bf16");
    } else {
      FD_MMA_M16N8K16("f16");
    }
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    typename Dev16<T>::pair h = Dev16<T>::from_f2(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
#undef FD_MMA_M16N8K16

__device__ __forceinline__ uint32_t pack_u16(uint16_t lo, uint16_t hi) {
  return (uint32_t)lo | ((uint32_t)hi << 16);
}

// Copy a [kBN x COLS] tile (rows n0.., cols 0..COLS-1) of a [L x D] matrix with unit column stride
// into shared memory, 16 bytes at a time; rows >= L and cols >= D are zero.
template <int COLS, int LD>
__device__ __forceinline__ void load_tile(uint16_t (*dst)[LD], const uint16_t* __restrict__ src,
                                          int64_t stride_row, int64_t n0, int64_t L, int D) {
  constexpr int kChunks = COLS / 8;
  for (int c = threadIdx.x; c < kBN * kChunks; c += kWarps * 32) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (n0 + r < L && col < D) {
      val = *reinterpret_cast<const uint4*>(src + (n0 + r) * stride_row + col);
    }
    *reinterpret_cast<uint4*>(&dst[r][col]) = val;
  }
}

// ---- tensor-core kernel (fp16 / bf16) ----------------------------------------------------------
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
    attn_fwd_mma_kernel(const uint16_t* __restrict__ Q,  // [B x H x Lq x D]
                        const uint16_t* __restrict__ K,  // [B x H x Lk x D]
                        const uint16_t* __restrict__ V,  // [B x H x Lk x D]
                        uint16_t* __restrict__ O,        // [B x H x Lq x D] contiguous
                        int64_t H,                    // heads
                        int64_t Lq, int64_t Lk,       // query / key lengths
                        int64_t sqb, int64_t sqh, int64_t sqm,  // Q strides (batch, head, row)
                        int64_t skb, int64_t skh, int64_t skn,  // K strides (batch, head, row)
                        int64_t svb, int64_t svh, int64_t svn,  // V strides (batch, head, row)
                        float scale_log2) {           // softmax scale * log2(e)
  constexpr int DK = (D + 15) / 16 * 16;  // QK^T contraction, padded to the mma's k = 16
  constexpr int KS = DK / 16;             // k-steps of QK^T
  constexpr int ND = D / 8;               // n = 8 tiles of the output
  constexpr int NS = kBN / 8;             // n = 8 tiles of S
  constexpr int LD = DK + kPad;
  __shared__ __align__(16) uint16_t Ks[kBN][LD];
  __shared__ __align__(16) uint16_t Vs[kBN][LD];

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H, h = bh % H;
  const uint16_t* q = Q + b * sqb + h * sqh;
  const uint16_t* k = K + b * skb + h * skh;
  const uint16_t* v = V + b * svb + h * svh;
  uint16_t* o = O + bh * Lq * D;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma group (row) and thread-in-group (column pair)
  const int64_t row0 = (int64_t)blockIdx.y * kBM + warp * 16 + g;  // rows row0 and row0 + 8
  const int64_t row1 = row0 + 8;

  // Q fragments (A operand, row-major m16k16) straight from global memory.
  uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t row = (r & 1) ? row1 : row0;
      const int col = ks * 16 + 2 * t + ((r & 2) ? 8 : 0);
      uint32_t val = 0u;
      if (row < Lq && col < D) val = *reinterpret_cast<const uint32_t*>(q + row * sqm + col);
      qf[ks][r] = val;
    }
  }

  float acc[ND][4];
#pragma unroll
  for (int i = 0; i < ND; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = attn::neg_inf(), m1 = attn::neg_inf();  // running max of rows row0 / row1
  float l0 = 0.f, l1 = 0.f;  // this thread's partial running sums (quad-reduced at the end)

  for (int64_t n0 = 0; n0 < Lk; n0 += kBN) {
    __syncthreads();  // previous tile fully consumed
    load_tile<DK, LD>(Ks, k, skn, n0, Lk, D);
    load_tile<DK, LD>(Vs, v, svn, n0, Lk, D);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[NS][4];
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&Ks[j * 8 + g][ks * 16 + 2 * t]);
        const uint32_t b1 =
            *reinterpret_cast<const uint32_t*>(&Ks[j * 8 + g][ks * 16 + 8 + 2 * t]);
        Mma<T>::run(s[j], qf[ks], b0, b1);
      }
    }
    // Scale to log2 units, mask keys past Lk, tile row max.
    float tmax0 = attn::neg_inf(), tmax1 = attn::neg_inf();
#pragma unroll
    for (int j = 0; j < NS; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t col = n0 + j * 8 + 2 * t + (e & 1);
        s[j][e] = col < Lk ? s[j][e] * scale_log2 : attn::neg_inf();
      }
      tmax0 = fmaxf(tmax0, fmaxf(s[j][0], s[j][1]));
      tmax1 = fmaxf(tmax1, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {  // the 4 threads of a quad share a row
      tmax0 = fmaxf(tmax0, __shfl_xor_sync(0xffffffffu, tmax0, off));
      tmax1 = fmaxf(tmax1, __shfl_xor_sync(0xffffffffu, tmax1, off));
    }
    const float mn0 = attn::row_new_max(m0, tmax0), mn1 = attn::row_new_max(m1, tmax1);
    const float ref0 = attn::row_ref(mn0), ref1 = attn::row_ref(mn1);
    const float alpha0 = attn::row_rescale(m0, ref0), alpha1 = attn::row_rescale(m1, ref1);
    m0 = mn0;
    m1 = mn1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      s[j][0] = attn::row_prob(s[j][0], ref0);
      s[j][1] = attn::row_prob(s[j][1], ref0);
      s[j][2] = attn::row_prob(s[j][2], ref1);
      s[j][3] = attn::row_prob(s[j][3], ref1);
      sum0 += s[j][0] + s[j][1];
      sum1 += s[j][2] + s[j][3];
    }
    l0 = attn::row_sum(l0, alpha0, sum0);
    l1 = attn::row_sum(l1, alpha1, sum1);
#pragma unroll
    for (int i = 0; i < ND; ++i) {
      acc[i][0] *= alpha0;
      acc[i][1] *= alpha0;
      acc[i][2] *= alpha1;
      acc[i][3] *= alpha1;
    }
    // O += P V: the S accumulator layout of key tiles 2kk, 2kk+1 is the A layout of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
      const int kr = kk * 16 + 2 * t;
#pragma unroll
      for (int i = 0; i < ND; ++i) {
        const int col = i * 8 + g;
        const uint32_t b0 = pack_u16(Vs[kr][col], Vs[kr + 1][col]);
        const uint32_t b1 = pack_u16(Vs[kr + 8][col], Vs[kr + 9][col]);
        Mma<T>::run(acc[i], pa, b0, b1);
      }
    }
  }

#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const float inv0 = attn::row_inv_sum(l0), inv1 = attn::row_inv_sum(l1);
#pragma unroll
  for (int i = 0; i < ND; ++i) {
    const int col = i * 8 + 2 * t;
    if (row0 < Lq)
      *reinterpret_cast<uint32_t*>(o + row0 * D + col) =
          Mma<T>::pack(acc[i][0] * inv0, acc[i][1] * inv0);
    if (row1 < Lq)
      *reinterpret_cast<uint32_t*>(o + row1 * D + col) =
          Mma<T>::pack(acc[i][2] * inv1, acc[i][3] * inv1);
  }
}

// ---- simple fp32 kernel ------------------------------------------------------------------------
// One thread per query row; the online-softmax update runs once per key (a tile of one key), so
// the only per-thread arrays are q and the accumulator (indexed with compile-time indices).
constexpr int kF32Rows = 128;  // query rows (threads) per CTA
constexpr int kF32BN = 32;     // keys per shared-memory tile

template <int D>
__global__ void __launch_bounds__(kF32Rows)
    attn_fwd_f32_kernel(const float* __restrict__ Q,  // [B x H x Lq x D]
                        const float* __restrict__ K,  // [B x H x Lk x D]
                        const float* __restrict__ V,  // [B x H x Lk x D]
                        float* __restrict__ O,        // [B x H x Lq x D] contiguous
                        int64_t H,                    // heads
                        int64_t Lq, int64_t Lk,       // query / key lengths
                        int64_t sqb, int64_t sqh, int64_t sqm,  // Q strides (batch, head, row)
                        int64_t skb, int64_t skh, int64_t skn,  // K strides (batch, head, row)
                        int64_t svb, int64_t svh, int64_t svn,  // V strides (batch, head, row)
                        float scale_log2) {           // softmax scale * log2(e)
  __shared__ float Ks[kF32BN][D];
  __shared__ float Vs[kF32BN][D];
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / H, h = bh % H;
  const float* q = Q + b * sqb + h * sqh;
  const float* k = K + b * skb + h * skh;
  const float* v = V + b * svb + h * svh;
  const int64_t row = (int64_t)blockIdx.y * kF32Rows + threadIdx.x;
  const bool live = row < Lq;

  float qr[D], acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qr[d] = live ? q[row * sqm + d] : 0.f;
    acc[d] = 0.f;
  }
  float m = attn::neg_inf(), l = 0.f;
  for (int64_t n0 = 0; n0 < Lk; n0 += kF32BN) {
    __syncthreads();
    for (int i = threadIdx.x; i < kF32BN * D; i += kF32Rows) {
      const int r = i / D, d = i % D;
      const bool ok = n0 + r < Lk;
      Ks[r][d] = ok ? k[(n0 + r) * skn + d] : 0.f;
      Vs[r][d] = ok ? v[(n0 + r) * svn + d] : 0.f;
    }
    __syncthreads();
    const int nvalid = (int)((Lk - n0) < kF32BN ? (Lk - n0) : kF32BN);
    for (int j = 0; j < nvalid; ++j) {
      float dot = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) dot = fmaf(qr[d], Ks[j][d], dot);
      const float s = dot * scale_log2;
      const float mn = attn::row_new_max(m, s);
      const float ref = attn::row_ref(mn);
      const float alpha = attn::row_rescale(m, ref);
      const float p = attn::row_prob(s, ref);
      m = mn;
      l = attn::row_sum(l, alpha, p);
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] = fmaf(p, Vs[j][d], acc[d] * alpha);
    }
  }
  if (live) {
    const float inv = attn::row_inv_sum(l);
    float* o = O + bh * Lq * D + row * D;
#pragma unroll
    for (int d = 0; d < D; ++d) o[d] = acc[d] * inv;
  }
}

struct Args {
  uintptr_t q, k, v, o;
  int64_t B, H, Lq, Lk;
  const int64_t *sq, *sk, *sv;
  float scale_log2;
  cudaStream_t stream;
};

// One CTA per (batch x head, tile of `rows` query rows), `threads` threads; E: the kernel's
// element type (uint16_t: the fp16 / bf16 bits).
template <typename E, typename Kernel>
void launch_kernel(const Args& a, Kernel kernel, int64_t rows, int threads, const char* name) {
  const long long tiles = (a.Lq + rows - 1) / rows;
  check_arg(tiles <= 65535, "attention: Lq too long for the CUDA kernel's grid");
  dim3 grid(clamp_grid_x(a.B * a.H), (unsigned)tiles);
  kernel<<<grid, threads, 0, a.stream>>>(
      reinterpret_cast<const E*>(a.q), reinterpret_cast<const E*>(a.k),
      reinterpret_cast<const E*>(a.v), reinterpret_cast<E*>(a.o), a.H, a.Lq, a.Lk, a.sq[0],
      a.sq[1], a.sq[2], a.sk[0], a.sk[1], a.sk[2], a.sv[0], a.sv[1], a.sv[2], a.scale_log2);
  check_launch(name);
}

template <typename T, int D>
void launch_mma(const Args& a) {
  launch_kernel<uint16_t>(a, attn_fwd_mma_kernel<T, D>, kBM, kWarps * 32, "attn_fwd_mma_kernel");
}

template <int D>
void launch_f32(const Args& a) {
  launch_kernel<float>(a, attn_fwd_f32_kernel<D>, kF32Rows, kF32Rows, "attn_fwd_f32_kernel");
}

template <int D>
void launch_dtype(const Args& a, DType dt) {
  switch (dt) {
    case DType::Float16: return launch_mma<__half, D>(a);
    case DType::BFloat16: return launch_mma<__nv_bfloat16, D>(a);
    case DType::Float32: return launch_f32<D>(a);
    default: throw std::invalid_argument("fastdiff: attention: unsupported dtype");
  }
}

}  // namespace

void attention_forward_cuda(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, int64_t B,
                            int64_t H, int64_t Lq, int64_t Lk, int64_t D, const int64_t* sq,
                            const int64_t* sk, const int64_t* sv, float scale, int dtype,
                            uintptr_t stream) {
  check_arg(B >= 1 && H >= 1 && Lq >= 1 && Lk >= 1, "attention: empty input");
  check_arg(sq[3] == 1 && sk[3] == 1 && sv[3] == 1, "attention: head dim must have unit stride");
  check_arg(B * H <= 2147483647LL, "attention: B*H exceeds the grid's x limit");
  const DType dt = to_dtype(dtype);
  // What the kernels assume about addresses (a violation would be a sticky CUDA
  // 'misaligned address' error that ruins the context, so refuse it here). Strides of size-1 dims
  // are never used. mma kernel: K/V rows are read as 16-byte vectors, Q and O as 4-byte pairs.
  auto aligned = [&](uintptr_t p, const int64_t* s, int64_t L, int64_t bytes) {
    const int64_t es = dt == DType::Float32 ? 4 : 2;
    const auto ok = [&](int64_t n, int64_t st) { return n == 1 || (st * es) % bytes == 0; };
    return p % bytes == 0 && ok(B, s[0]) && ok(H, s[1]) && ok(L, s[2]);
  };
  if (dt == DType::Float16 || dt == DType::BFloat16) {
    check_arg(aligned(k, sk, Lk, 16) && aligned(v, sv, Lk, 16),
              "attention: fp16/bf16 k and v need 16-byte aligned base addresses and row/head/"
              "batch strides (multiples of 8 elements)");
    check_arg(aligned(q, sq, Lq, 4) && o % 4 == 0,
              "attention: fp16/bf16 q and o need 4-byte aligned addresses and even strides");
  } else {
    check_arg(q % 4 == 0 && k % 4 == 0 && v % 4 == 0 && o % 4 == 0,
              "attention: fp32 q, k, v, o need 4-byte aligned addresses");
  }
  const Args a{q, k, v, o, B, H, Lq, Lk, sq, sk, sv, scale * attn::kLog2e, as_stream(stream)};
  switch (D) {
    case 32: return launch_dtype<32>(a, dt);
    case 40: return launch_dtype<40>(a, dt);
    case 64: return launch_dtype<64>(a, dt);
    case 80: return launch_dtype<80>(a, dt);
    case 96: return launch_dtype<96>(a, dt);
    case 128: return launch_dtype<128>(a, dt);
    case 160: return launch_dtype<160>(a, dt);
    default:
      throw std::invalid_argument("fastdiff: attention: CUDA kernel supports D in "
                                  "{32,40,64,80,96,128,160}, got " + std::to_string(D));
  }
}

}  // namespace fastdiff
