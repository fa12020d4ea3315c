// Stand-in for the toolkit's cuda_runtime.h when csrc/cuda/*.cu is built for the CPU emulator:
// everything the kernels' host code needs comes from fd_cuda_emu.h (force-included first).
#pragma once
#include "fd_cuda_emu.h"
