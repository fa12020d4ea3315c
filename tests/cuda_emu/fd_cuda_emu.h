// A CPU emulator of the CUDA execution model, enough to run csrc/cuda/*.cu without a GPU.
//
// Force-included (g++ -include) before every translated .cu file by tests/cuda_emu/build.py.
// Each CUDA thread is a fiber (its own stack); the threads of one block run cooperatively on one
// OS thread, block after block. __syncthreads is a block barrier, warp shuffles and mma.sync are
// warp-collective (every lane deposits its registers, the warp meets at a barrier, each lane reads
// what the instruction gives it). A barrier that not every thread reaches (divergent
// __syncthreads, an early return before one) is reported as an error instead of hanging.
// __shared__ arrays become function statics (one block runs at a time); dynamic shared memory is
// poisoned with 0xFF bytes (NaN) before every block. Launch configurations are checked against
// the hardware limits (1024 threads per block, grid.y/z <= 65535, 48 KB dynamic shared memory
// without an opt-in), and a bad one is a launch error returned by cudaGetLastError.
//
// What it cannot show: timing, occupancy, register spills, memory-model races between blocks
// (blocks run one after another), and the __CUDA_ARCH__ branches of the shared headers (the host
// branches run, i.e. the CPU twin's arithmetic).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

// ---- keywords ---------------------------------------------------------------------------------
// The toolkit's host_defines.h maps these to nothing for a host compiler; __shared__ must instead
// be shared by the block's fibers.
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

namespace fd_emu {

struct Fiber;

// Per-thread built-ins of the running fiber (the scheduler sets them before every resume).
extern thread_local uint3 g_thread_idx;
extern thread_local uint3 g_block_idx;
extern thread_local dim3 g_block_dim;
extern thread_local dim3 g_grid_dim;

void block_barrier();  // __syncthreads
bool warp_barrier();  // the lanes of the caller's warp meet; true for the one completing it
unsigned char* warp_slot(int lane);  // 64 bytes per lane, shared by the caller's warp
unsigned char* dyn_smem();           // the block's dynamic shared memory
void check_full_warp(const char* what);  // warp collectives: all 32 lanes must exist
// Static __shared__ arrays are function statics; build.py calls this after each declaration so
// that every block starts with them poisoned (0xFF bytes), not zero or the last block's data.
void poison_shared(void* p, size_t bytes);
[[noreturn]] void fail(const char* what);

// Runs body once per thread of every block of the grid (blocks in order).
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

inline int lane_id() {
  const unsigned t =
      g_thread_idx.x + g_block_dim.x * (g_thread_idx.y + g_block_dim.y * g_thread_idx.z);
  return (int)(t & 31u);
}

// The last 4 bytes of a lane's slot tag the collective it is in: lanes of one warp meeting in
// different collectives (a shuffle and an mma, or shuffles of different sizes) is a bug.
constexpr int kTagOffset = 60;
inline void set_tag(int lane, uint32_t tag) { std::memcpy(warp_slot(lane) + kTagOffset, &tag, 4); }
inline uint32_t get_tag(int lane) {
  uint32_t t;
  std::memcpy(&t, warp_slot(lane) + kTagOffset, 4);
  return t;
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask, int width) {
  static_assert(sizeof(T) <= 56, "shuffle operand too large");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync: the emulator supports the full mask only");
  if (width != 32) fail("__shfl_xor_sync: the emulator supports width 32 only");
  check_full_warp("__shfl_xor_sync with the full mask");
  const int lane = lane_id();
  const uint32_t tag = 0x5F000000u | (uint32_t)sizeof(T);
  std::memcpy(warp_slot(lane), &v, sizeof(T));
  set_tag(lane, tag);
  warp_barrier();
  const int src = (lane ^ lane_mask) & 31;
  if (get_tag(src) != tag) fail("__shfl_xor_sync: lanes of a warp in different collectives");
  T r;
  std::memcpy(&r, warp_slot(src), sizeof(T));
  warp_barrier();
  return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d = a b + d, per the PTX ISA
// fragment layouts ("Matrix Fragments for mma.m16n8k16 with floating point type"): with
// g = lane >> 2 and t = lane % 4, A register r holds row g + 8 (r & 1), columns 2t + 8 (r >> 1)
// and 2t + 8 (r >> 1) + 1 (low half first); B register r holds rows (k) 2t + 8 r, +1 at column g;
// D element i holds row g + 8 (i >> 1), column 2t + (i & 1). Products are exact in fp32 (11- or
// 8-bit significands); the sum runs in fp32 in k order (the hardware's order is unspecified).
float half_bits_to_float(uint16_t h, bool bf16);
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);

}  // namespace fd_emu

// ---- built-in variables and functions ---------------------------------------------------------
#define threadIdx (::fd_emu::g_thread_idx)
#define blockIdx (::fd_emu::g_block_idx)
#define blockDim (::fd_emu::g_block_dim)
#define gridDim (::fd_emu::g_grid_dim)

inline void __syncthreads() { fd_emu::block_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return fd_emu::shfl_xor(mask, v, lane_mask, width);
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// ---- runtime API (the subset the kernels' host code calls) ------------------------------------
cudaError_t fd_emu_get_last_error();
const char* fd_emu_error_string(cudaError_t e);
int fd_emu_sm_count();
#define cudaGetLastError fd_emu_get_last_error
#define cudaGetErrorString fd_emu_error_string
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 0;  // not a real runtime
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *v = fd_emu_sm_count();
  return cudaSuccess;
}

namespace fd_emu {
// `kernel<<<grid, block, smem, stream>>>(args)` is rewritten by build.py into
// `fd_emu::launch([&] { kernel(args); }, grid, block, smem, stream)`.
void launch(const std::function<void()>& body, dim3 grid, dim3 block, size_t smem = 0,
            cudaStream_t stream = nullptr);
}  // namespace fd_emu
