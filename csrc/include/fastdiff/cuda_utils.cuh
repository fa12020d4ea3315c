// CUDA helpers shared by every .cu file: launch checking and stream handles.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastdiff {

// Check the last launch; raise (-> Python RuntimeError) naming the kernel.
inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastdiff CUDA kernel '") + kernel +
                             "' failed: " + cudaGetErrorString(err));
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastdiff CUDA call '") + what +
                             "' failed: " + cudaGetErrorString(err));
  }
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Grid sizes: keep every axis within hardware limits (x: 2^31-1, y/z: 65535).
inline unsigned int clamp_grid_x(long long blocks) {
  const long long cap = 2147483647LL;
  return (unsigned int)(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

// Multiprocessors of the current device (at least 1).
inline int sm_count() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
             "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

// Grid of a grid-stride kernel over `items` work items, `threads` per block: one item per thread
// up to 16 blocks per multiprocessor, the kernel's loop beyond that.
inline unsigned int grid_stride_blocks(int64_t items, int threads) {
  const int64_t needed = (items + threads - 1) / threads;
  const int64_t cap = (int64_t)sm_count() * 16;
  return clamp_grid_x(needed < cap ? needed : cap);
}

}  // namespace fastdiff
