// Python bindings of the fused UniPC step (CPU and, when compiled in, CUDA). Registered from
// register_sampler_step (csrc/bind_sampler_step.cpp), the sampler ops' family.
#include <pybind11/pybind11.h>

#include "fastdiff/unipc_math.h"
#ifdef FASTDIFF_WITH_CUDA
#include "fastdiff/unipc_cuda.h"
#endif

namespace fastdiff {
namespace {

// The flat argument list of fastdiff/ops/unipc_step.py::_run_kernel (both entry points; the CUDA
// one adds the stream) and its names.
#define FD_UNIPC_PARAMS                                                                         \
  int64_t n, int64_t inner, uintptr_t x, int64_t bs_x, uintptr_t mo, int64_t bs_m, uintptr_t mu, \
      int64_t bs_mu, uintptr_t last, int64_t bs_last, uintptr_t m1, int64_t bs_m1,             \
      uintptr_t m2, int64_t bs_m2, uintptr_t coef, uintptr_t xc, uintptr_t x0, uintptr_t xn,    \
      int dtype_x, int dtype_m, int pred, bool clip, float clip_r, bool cfg, float g,           \
      uintptr_t m3, int64_t bs_m3
#define FD_UNIPC_NAMES                                                                           \
  n, inner, x, bs_x, mo, bs_m, mu, bs_mu, last, bs_last, m1, bs_m1, m2, bs_m2, coef, xc, x0, xn, \
      dtype_x, dtype_m, pred, clip, clip_r, cfg, g, m3, bs_m3

// FD_UNIPC_PARAMS -> UniPCArgs.
UniPCArgs make_unipc_args(FD_UNIPC_PARAMS) {
  check_arg(x != 0 && mo != 0 && coef != 0 && xc != 0 && x0 != 0 && xn != 0,
            "unipc_step: x, model output, coef and the outputs must be given");
  UniPCArgs A;
  A.n = n;
  A.inner = inner;
  A.x = x;
  A.bs_x = bs_x;
  A.m = mo;
  A.bs_m = bs_m;
  A.mu = mu;
  A.bs_mu = bs_mu;
  A.last = last;
  A.bs_last = bs_last;
  A.m1 = m1;
  A.bs_m1 = bs_m1;
  A.m2 = m2;
  A.bs_m2 = bs_m2;
  A.m3 = m3;
  A.bs_m3 = bs_m3;
  A.coef = coef;
  A.xc = xc;
  A.x0 = x0;
  A.xn = xn;
  A.dtype_x = dtype_x;
  A.dtype_m = dtype_m;
  A.pred = pred;
  A.clip = clip;
  A.clip_r = clip_r;
  A.cfg = cfg;
  A.g = g;
  return A;
}

}  // namespace

void register_unipc_step(pybind11::module_& m) {
  namespace py = pybind11;
  // the kernels take the order-3 operand m_{i-3} (trailing m3, bs_m3) and read a 12-wide row
  m.attr("unipc_step_m3") = true;
  m.def(
      "unipc_step_cpu",
      [](FD_UNIPC_PARAMS) {
        UniPCArgs A = make_unipc_args(FD_UNIPC_NAMES);
        py::gil_scoped_release nogil;
        unipc_step_cpu(A);
      },
      "fused UniPC step on CPU memory (see fastdiff/ops/unipc_step.py)");
#ifdef FASTDIFF_WITH_CUDA
  m.def(
      "unipc_step_cuda",
      [](FD_UNIPC_PARAMS, uintptr_t stream) {
        UniPCArgs A = make_unipc_args(FD_UNIPC_NAMES);
        unipc_step_cuda(A, stream);
      },
      "fused UniPC step on CUDA memory, on the given stream");
#endif
}
#undef FD_UNIPC_PARAMS
#undef FD_UNIPC_NAMES

}  // namespace fastdiff
