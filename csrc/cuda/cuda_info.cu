// Build-wide CUDA helpers: runtime version and device count (used by build_info()).
#include "fastdiff/cuda_api.h"
#include "fastdiff/cuda_utils.cuh"

namespace fastdiff {

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

}  // namespace fastdiff
