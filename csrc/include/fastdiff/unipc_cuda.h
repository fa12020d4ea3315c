// CUDA entry point of the fused UniPC step (csrc/cuda/unipc_step.cu). Plain C++ so the bindings
// compile with the host compiler alone.
#pragma once
#include <cstdint>

#include "fastdiff/unipc_math.h"

namespace fastdiff {
// Launches on `stream` (torch's current stream); no host synchronisation.
void unipc_step_cuda(const UniPCArgs& args, uintptr_t stream);
}  // namespace fastdiff
