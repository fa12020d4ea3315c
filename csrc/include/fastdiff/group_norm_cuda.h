// CUDA entry point of fused GroupNorm(+add, +scale/shift)+SiLU (csrc/cuda/group_norm.cu).
#pragma once
#include <cstdint>

#include "fastdiff/group_norm_math.h"

namespace fastdiff {
// Launches on `stream` (a cudaStream_t as an integer); raises std::runtime_error naming the
// kernel on a launch failure.
void group_norm_silu_cuda(const GroupNormArgs& a, uintptr_t stream);
// fp32 elements of scratch the plan for `a` needs (host-only; 0 for the one-kernel plan).
int64_t group_norm_silu_cuda_workspace(const GroupNormArgs& a);
}  // namespace fastdiff
