// fastdiff._C: the pybind11 module. It does not link libtorch: every kernel entry point takes raw
// addresses, sizes, strides, a dtype code and (CUDA) a stream handle.
#include <pybind11/pybind11.h>

#include "fastdiff/common.h"
#include "fastdiff/cpu_isa.h"
#include "fastdiff/registry.h"
#ifdef FASTDIFF_WITH_CUDA
#include "fastdiff/cuda_api.h"
#endif

#ifndef FASTDIFF_CXX_COMPILER
#define FASTDIFF_CXX_COMPILER "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff native kernels (C++ CPU and, when compiled in, CUDA)";
  py::dict info;
#ifdef FASTDIFF_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = FASTDIFF_CUDA_ARCHS_STR;
  info["cuda_compiler"] = FASTDIFF_CUDA_COMPILER;
  m.def("cuda_runtime_version", &fastdiff::cuda_runtime_version);
  m.def("cuda_device_count", &fastdiff::cuda_device_count);
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_compiler"] = "";
#endif
#ifdef FASTDIFF_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cxx_compiler"] = FASTDIFF_CXX_COMPILER;
  // the CPU kernels' code paths: x86-64 AVX2+FMA versions picked at run time, or baseline only
  info["cpu_dispatch"] = FD_X86_DISPATCH ? "x86-64-v3,baseline" : "baseline";
  m.attr("BUILD_INFO") = info;
  m.attr("ABI_VERSION") = FASTDIFF_ABI_VERSION;

  fastdiff::register_sampler_step(m);
  fastdiff::register_group_norm(m);
  fastdiff::register_attention(m);
}
