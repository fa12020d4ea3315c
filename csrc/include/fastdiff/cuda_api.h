// Plain C++ declarations of the CUDA entry points (implemented in csrc/cuda/*.cu), so the
// pybind11 bindings compile with the host compiler alone. Each op family adds its own header;
// this one holds the build-wide helpers.
#pragma once
#include <cstdint>
#include <string>

namespace fastdiff {
int cuda_runtime_version();
int cuda_device_count();
}  // namespace fastdiff
