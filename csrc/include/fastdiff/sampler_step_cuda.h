// CUDA entry point of the fused sampler update (csrc/cuda/sampler_step.cu). Plain C++ so the
// bindings compile with the host compiler alone.
#pragma once
#include <cstdint>

#include "fastdiff/sampler_math.h"

namespace fastdiff {
// Launches on `stream` (torch's current stream); no host synchronisation.
void sampler_step_cuda(const StepArgs& args, uintptr_t stream);
}  // namespace fastdiff
