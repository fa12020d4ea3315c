// Python bindings of the fused sampler update (CPU and, when compiled in, CUDA).
#include <pybind11/pybind11.h>

#include "fastdiff/registry.h"
#include "fastdiff/sampler_math.h"
#ifdef FASTDIFF_WITH_CUDA
#include "fastdiff/sampler_step_cuda.h"
#endif

namespace fastdiff {
namespace {

// Flat argument list (see fastdiff/ops/sampler_step.py::_run_kernel) -> StepArgs.
StepArgs make_args(int mode, int64_t n, int64_t inner, int64_t nhwc_c, int64_t hw, uintptr_t x,
                   int64_t bs_x, uintptr_t m, int64_t bs_m, uintptr_t mu, int64_t bs_mu,
                   uintptr_t v, int64_t bs_v, uintptr_t z, int64_t bs_z, uintptr_t gen,
                   uintptr_t coef, uintptr_t out, uintptr_t x0, int dtype_x, int dtype_m, int pred,
                   bool clip, float clip_r, bool recompute, bool cfg, float g) {
  check_arg(mode == 0 || mode == 1, "sampler_step: mode must be 0 or 1");
  check_arg(pred >= 0 && pred <= 2, "sampler_step: prediction type code must be 0, 1 or 2");
  StepArgs A;
  A.n = n;
  A.inner = inner;
  A.nhwc_c = nhwc_c;
  A.hw = hw;
  A.x = x;
  A.bs_x = bs_x;
  A.m = m;
  A.bs_m = bs_m;
  A.mu = mu;
  A.bs_mu = bs_mu;
  A.v = v;
  A.bs_v = bs_v;
  A.z = z;
  A.bs_z = bs_z;
  A.gen = mode == 0 ? gen : 0;
  A.coef = coef;
  A.out = out;
  A.x0 = x0;
  A.dtype_x = dtype_x;
  A.dtype_m = dtype_m;
  A.opt.mode = mode;
  A.opt.pred = pred;
  A.opt.clip = clip;
  A.opt.clip_r = clip_r;
  A.opt.recompute = recompute;
  A.opt.cfg = cfg;
  A.opt.g = g;
  A.opt.learned_var = mode == 0 && v != 0;
  A.opt.has_z = z != 0 || A.gen != 0;
  return A;
}

}  // namespace

void register_sampler_step(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "sampler_step_cpu",
      [](int mode, int64_t n, int64_t inner, int64_t nhwc_c, int64_t hw, uintptr_t x, int64_t bs_x,
         uintptr_t mo, int64_t bs_m, uintptr_t mu, int64_t bs_mu, uintptr_t v, int64_t bs_v,
         uintptr_t z, int64_t bs_z, uintptr_t gen, uintptr_t coef, uintptr_t out, uintptr_t x0,
         int dtype_x, int dtype_m, int pred, bool clip, float clip_r, bool recompute, bool cfg,
         float g) {
        StepArgs A = make_args(mode, n, inner, nhwc_c, hw, x, bs_x, mo, bs_m, mu, bs_mu, v, bs_v,
                               z, bs_z, gen, coef, out, x0, dtype_x, dtype_m, pred, clip, clip_r,
                               recompute, cfg, g);
        py::gil_scoped_release nogil;
        sampler_step_cpu(A);
      },
      "Fused sampler update / DPM-Solver++ 2M step on CPU buffers (see sampler_math.h StepArgs)");
#ifdef FASTDIFF_WITH_CUDA
  m.def(
      "sampler_step_cuda",
      [](int mode, int64_t n, int64_t inner, int64_t nhwc_c, int64_t hw, uintptr_t x, int64_t bs_x,
         uintptr_t mo, int64_t bs_m, uintptr_t mu, int64_t bs_mu, uintptr_t v, int64_t bs_v,
         uintptr_t z, int64_t bs_z, uintptr_t gen, uintptr_t coef, uintptr_t out, uintptr_t x0,
         int dtype_x, int dtype_m, int pred, bool clip, float clip_r, bool recompute, bool cfg,
         float g, uintptr_t stream) {
        StepArgs A = make_args(mode, n, inner, nhwc_c, hw, x, bs_x, mo, bs_m, mu, bs_mu, v, bs_v,
                               z, bs_z, gen, coef, out, x0, dtype_x, dtype_m, pred, clip, clip_r,
                               recompute, cfg, g);
        sampler_step_cuda(A, stream);
      },
      "Fused sampler update / DPM-Solver++ 2M step on CUDA buffers, on `stream`");
#endif
}

}  // namespace fastdiff
