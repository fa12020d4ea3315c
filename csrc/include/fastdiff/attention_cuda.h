// CUDA entry points of the fused attention forward (csrc/cuda/attention.cu). Plain C++ so the
// pybind11 bindings compile with the host compiler alone.
#pragma once
#include <cstdint>

namespace fastdiff {

// O = softmax(scale * Q K^T) V, non-causal, flash-style (O(L) memory).
// q [B x H x Lq x D], k/v [B x H x Lk x D] with strides s*[4] (elements; s*[3] must be 1 and rows
// 16-byte aligned for fp16/bf16); o contiguous [B x H x Lq x D]. dtype: DType code (fp32/fp16/bf16).
// D must be one of 32, 40, 64, 80, 96, 128, 160. fp16/bf16 use tensor cores (mma.sync m16n8k16,
// fp32 accumulators); fp32 uses a simple CUDA-core path.
void attention_forward_cuda(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, int64_t B,
                            int64_t H, int64_t Lq, int64_t Lk, int64_t D, const int64_t* sq,
                            const int64_t* sk, const int64_t* sv, float scale, int dtype,
                            uintptr_t stream);

}  // namespace fastdiff
