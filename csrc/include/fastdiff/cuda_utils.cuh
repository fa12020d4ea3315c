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

}  // namespace fastdiff
