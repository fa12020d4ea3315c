// Python bindings of the fused sampler update (CPU and, when compiled in, CUDA).
//
// Two CPU entry points: the general `sampler_step_cpu` (29 arguments through pybind11) and the
// planned pair used by the eager fast path of fastdiff/ops/_sampler_step_kernels.py:
// `sampler_step_cpu_plan(...)` packs the per-layout arguments once into a capsule, and
// `sampler_step_cpu_run(plan, x, mo, third, gen, coef, out, x0, clip_r, g)` is a METH_FASTCALL
// function (no pybind11 dispatcher: ~1 us less per call) that adds the per-call addresses.
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "fastdiff/registry.h"
#include "fastdiff/sampler_math.h"
#ifdef FASTDIFF_WITH_CUDA
#include "fastdiff/sampler_step_cuda.h"
#endif

namespace fastdiff {
namespace {

// The flat argument list of the general entry points (see fastdiff/ops/sampler_step.py::
// _run_kernel) up to the guidance scale, and its names; then the history operands (the CUDA entry
// point takes the stream between the two).
#define FD_STEP_PARAMS                                                                           \
  int mode, int64_t n, int64_t inner, int64_t nhwc_c, int64_t hw, uintptr_t x, int64_t bs_x,     \
      uintptr_t mo, int64_t bs_m, uintptr_t mu, int64_t bs_mu, uintptr_t v, int64_t bs_v,        \
      uintptr_t z, int64_t bs_z, uintptr_t w, int64_t bs_w, uintptr_t gen, uintptr_t coef,       \
      uintptr_t out, uintptr_t x0, int dtype_x, int dtype_m, int pred, bool clip, float clip_r, \
      bool recompute, bool cfg, float g
#define FD_STEP_NAMES                                                                           \
  mode, n, inner, nhwc_c, hw, x, bs_x, mo, bs_m, mu, bs_mu, v, bs_v, z, bs_z, w, bs_w, gen, coef, \
      out, x0, dtype_x, dtype_m, pred, clip, clip_r, recompute, cfg, g
#define FD_STEP_HIST_PARAMS \
  uintptr_t q, int64_t bs_q, uintptr_t q3, int64_t bs_q3, uintptr_t q4, int64_t bs_q4
#define FD_STEP_HIST_NAMES q, bs_q, q3, bs_q3, q4, bs_q4

// FD_STEP_PARAMS and the history operands -> StepArgs.
StepArgs make_args(FD_STEP_PARAMS, FD_STEP_HIST_PARAMS) {
  check_arg(mode == 0 || mode == 1, "sampler_step: mode must be 0 or 1");
  check_arg(pred >= 0 && pred <= 2, "sampler_step: prediction type code must be 0, 1 or 2");
  StepArgs A;
  A.n = n;
  A.inner = inner;
  A.nhwc_c = nhwc_c;
  A.hw = hw;
  A.x = x;
  A.bs_x = bs_x;
  A.m = mo;
  A.bs_m = bs_m;
  A.mu = mu;
  A.bs_mu = bs_mu;
  A.v = v;
  A.bs_v = bs_v;
  A.z = z;
  A.bs_z = bs_z;
  A.w = mode == 1 ? w : 0;
  A.bs_w = bs_w;
  A.q = q;  // not masked by mode: the kernels refuse x0_prev2 outside mode 1 / without x0_prev
  A.bs_q = bs_q;
  A.q3 = q3;  // likewise: refused without x0_prev2 (x0_prev4: without x0_prev3)
  A.bs_q3 = bs_q3;
  A.q4 = q4;
  A.bs_q4 = bs_q4;
  A.gen = gen;
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
  A.opt.has_z = z != 0 || (mode == 0 && A.gen != 0);
  A.opt.has_noise = mode == 1 && (A.w != 0 || A.gen != 0);
  A.opt.has_prev2 = A.q != 0;
  A.opt.has_prev3 = A.q3 != 0;
  A.opt.has_prev4 = A.q4 != 0;
  return A;
}

// Per-layout part of StepArgs (addresses zero), and the model-output operands as byte offsets
// from the model output's address (the CFG halves and the variance channels are views of it).
struct StepPlan {
  StepArgs base;
  uintptr_t off_m = 0, off_mu = 0, off_v = 0;
  bool lv = false;
};

constexpr const char* kPlanName = "fastdiff.sampler_step_plan";

// Argument names of the general entry points (sampler_step_cpu / _cuda), so that the trailing
// x0_prev2 / x0_prev3 / x0_prev4 operands can default to absent.
#define FD_STEP_ARGS                                                                            \
  py::arg("mode"), py::arg("n"), py::arg("inner"), py::arg("nhwc_c"), py::arg("hw"),           \
      py::arg("x"), py::arg("bs_x"), py::arg("m"), py::arg("bs_m"), py::arg("mu"),              \
      py::arg("bs_mu"), py::arg("v"), py::arg("bs_v"), py::arg("z"), py::arg("bs_z"),           \
      py::arg("w"), py::arg("bs_w"), py::arg("gen"), py::arg("coef"), py::arg("out"),           \
      py::arg("x0"), py::arg("dtype_x"), py::arg("dtype_m"), py::arg("pred"), py::arg("clip"),  \
      py::arg("clip_r"), py::arg("recompute"), py::arg("cfg"), py::arg("g")
constexpr int64_t kGilFreeElems = int64_t{1} << 14;  // smaller steps keep the GIL (~0.1 us)

// Address argument: a Python int (0 = absent).
bool addr_arg(PyObject* o, uintptr_t* out) {
  unsigned long long v = PyLong_AsUnsignedLongLong(o);
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return false;
  *out = static_cast<uintptr_t>(v);
  return true;
}

// sampler_step_cpu_run(plan, x, mo, third, gen, coef, out, x0, clip_r, g[, w[, q[, q3[, q4]]]])
PyObject* run_planned(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 10 || nargs > 14) {
    PyErr_Format(PyExc_TypeError,
                 "sampler_step_cpu_run takes 10 to 14 arguments, got %zd (w, then x0_prev2, "
                 "x0_prev3, x0_prev4 of a dpm step)",
                 nargs);
    return nullptr;
  }
  auto* plan = static_cast<const StepPlan*>(PyCapsule_GetPointer(args[0], kPlanName));
  if (plan == nullptr) return nullptr;
  uintptr_t x, mo, z, gen, coef, out, x0;
  if (!addr_arg(args[1], &x) || !addr_arg(args[2], &mo) || !addr_arg(args[3], &z) ||
      !addr_arg(args[4], &gen) || !addr_arg(args[5], &coef) || !addr_arg(args[6], &out) ||
      !addr_arg(args[7], &x0))
    return nullptr;
  uintptr_t w = 0;
  if (nargs >= 11 && !addr_arg(args[10], &w)) return nullptr;
  uintptr_t q = 0, q3 = 0, q4 = 0;
  if (nargs >= 12 && !addr_arg(args[11], &q)) return nullptr;
  if (nargs >= 13 && !addr_arg(args[12], &q3)) return nullptr;
  if (nargs == 14 && !addr_arg(args[13], &q4)) return nullptr;
  double clip_r = PyFloat_AsDouble(args[8]);
  if (clip_r == -1.0 && PyErr_Occurred()) return nullptr;
  double g = PyFloat_AsDouble(args[9]);
  if (g == -1.0 && PyErr_Occurred()) return nullptr;
  StepArgs A = plan->base;
  const int mode = A.opt.mode;
  A.x = x;
  A.m = mo + plan->off_m;
  A.mu = A.opt.cfg ? mo + plan->off_mu : 0;
  A.v = plan->lv ? mo + plan->off_v : 0;
  A.z = z;
  A.w = mode == 1 ? w : 0;
  A.q = q;
  A.q3 = q3;
  A.q4 = q4;
  A.gen = gen;
  A.coef = coef;
  A.out = out;
  A.x0 = x0;
  A.opt.clip_r = static_cast<float>(clip_r);
  A.opt.g = static_cast<float>(g);
  A.opt.learned_var = mode == 0 && A.v != 0;
  A.opt.has_z = A.z != 0 || (mode == 0 && A.gen != 0);
  A.opt.has_noise = mode == 1 && (A.w != 0 || A.gen != 0);
  A.opt.has_prev2 = A.q != 0;
  A.opt.has_prev3 = A.q3 != 0;
  A.opt.has_prev4 = A.q4 != 0;
  PyObject* exc_type = nullptr;
  std::string msg;
  PyThreadState* ts = A.n * A.inner >= kGilFreeElems ? PyEval_SaveThread() : nullptr;
  try {
    sampler_step_cpu(A);
  } catch (const std::invalid_argument& e) {
    exc_type = PyExc_ValueError;
    msg = e.what();
  } catch (const std::exception& e) {
    exc_type = PyExc_RuntimeError;
    msg = e.what();
  } catch (...) {
    exc_type = PyExc_RuntimeError;
    msg = "fastdiff: sampler_step: unknown C++ exception";
  }
  if (ts != nullptr) PyEval_RestoreThread(ts);
  if (exc_type != nullptr) {
    PyErr_SetString(exc_type, msg.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef run_planned_def = {
    "sampler_step_cpu_run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(run_planned)),
    METH_FASTCALL,
    "sampler_step_cpu_run(plan, x, mo, third, gen, coef, out, x0, clip_r, g[, w[, q[, q3[, "
    "q4]]]]): the cpu step with a plan from sampler_step_cpu_plan; addresses are ints (0 = "
    "absent), mo is the model output's address (the plan holds the operands' byte offsets from "
    "it); w is the noise and q, q3, q4 the x0_prev2, x0_prev3, x0_prev4 of a dpm step (mode 1)"};

}  // namespace

void register_unipc_step(pybind11::module_& m);  // csrc/bind_unipc.cpp

void register_sampler_step(pybind11::module_& m) {
  namespace py = pybind11;
  register_unipc_step(m);
  m.def(
      "sampler_step_cpu",
      [](FD_STEP_PARAMS, FD_STEP_HIST_PARAMS) {
        StepArgs A = make_args(FD_STEP_NAMES, FD_STEP_HIST_NAMES);
        py::gil_scoped_release nogil;
        sampler_step_cpu(A);
      },
      "Fused sampler update / DPM-Solver++ 2M / 3M step on CPU buffers (see sampler_math.h "
      "StepArgs); q, bs_q: x0_prev2 of the 3M step; q3 / q4: x0_prev3 / x0_prev4 (coef[8] / "
      "coef[9]; optional, 0 = absent)",
      FD_STEP_ARGS, py::arg("q") = 0, py::arg("bs_q") = 0, py::arg("q3") = 0,
      py::arg("bs_q3") = 0, py::arg("q4") = 0, py::arg("bs_q4") = 0);
  m.def(
      "sampler_step_cpu_plan",
      [](int mode, int64_t n, int64_t inner, int64_t nhwc_c, int64_t hw, int64_t bs_x,
         uintptr_t off_m, int64_t bs_m, uintptr_t off_mu, int64_t bs_mu, uintptr_t off_v,
         int64_t bs_v, int64_t bs_z, int dtype_x, int dtype_m, int pred, bool clip,
         bool recompute, bool cfg, bool lv, int64_t bs_w, int64_t bs_q, int64_t bs_q3,
         int64_t bs_q4) {
        auto plan = std::make_unique<StepPlan>();
        plan->base = make_args(mode, n, inner, nhwc_c, hw, 0, bs_x, 0, bs_m, 0, bs_mu, 0, bs_v, 0,
                               bs_z, 0, bs_w, 0, 0, 0, 0, dtype_x, dtype_m, pred, clip, 0.0f,
                               recompute, cfg, 0.0f, 0, bs_q, 0, bs_q3, 0, bs_q4);
        plan->off_m = off_m;
        plan->off_mu = off_mu;
        plan->off_v = off_v;
        plan->lv = lv;
        py::capsule cap(plan.get(), kPlanName,
                        [](void* p) { delete static_cast<StepPlan*>(p); });
        plan.release();
        return cap;
      },
      "Launch plan (a capsule) of one cpu sampler-step layout for sampler_step_cpu_run: the "
      "arguments of sampler_step_cpu without addresses, model-output operands as byte offsets",
      py::arg("mode"), py::arg("n"), py::arg("inner"), py::arg("nhwc_c"), py::arg("hw"),
      py::arg("bs_x"), py::arg("off_m"), py::arg("bs_m"), py::arg("off_mu"), py::arg("bs_mu"),
      py::arg("off_v"), py::arg("bs_v"), py::arg("bs_z"), py::arg("dtype_x"), py::arg("dtype_m"),
      py::arg("pred"), py::arg("clip"), py::arg("recompute"), py::arg("cfg"), py::arg("lv"),
      py::arg("bs_w") = 0, py::arg("bs_q") = 0, py::arg("bs_q3") = 0, py::arg("bs_q4") = 0);
  m.attr("sampler_step_prev2") = true;  // the entry points take x0_prev2 (DPM++ 3M)
  m.attr("sampler_step_eps") = true;  // the dpm kernels form c_eps eps (coef[7])
  // the entry points take x0_prev3 / x0_prev4 (coef[8] / coef[9]: SA-Solver orders 3-4)
  m.attr("sampler_step_prev4") = true;
  m.add_object("sampler_step_cpu_run",
               py::reinterpret_steal<py::object>(
                   PyCFunction_NewEx(&run_planned_def, nullptr, m.attr("__name__").ptr())));
#ifdef FASTDIFF_WITH_CUDA
  m.def(
      "sampler_step_cuda",
      [](FD_STEP_PARAMS, uintptr_t stream, FD_STEP_HIST_PARAMS) {
        StepArgs A = make_args(FD_STEP_NAMES, FD_STEP_HIST_NAMES);
        sampler_step_cuda(A, stream);
      },
      "Fused sampler update / DPM-Solver++ 2M / 3M step on CUDA buffers, on `stream`; q, bs_q: "
      "x0_prev2 of the 3M step; q3 / q4: x0_prev3 / x0_prev4 (coef[8] / coef[9]; optional, 0 = "
      "absent)",
      FD_STEP_ARGS, py::arg("stream"), py::arg("q") = 0, py::arg("bs_q") = 0, py::arg("q3") = 0,
      py::arg("bs_q3") = 0, py::arg("q4") = 0, py::arg("bs_q4") = 0);
#endif
}
#undef FD_STEP_PARAMS
#undef FD_STEP_NAMES
#undef FD_STEP_HIST_PARAMS
#undef FD_STEP_HIST_NAMES

}  // namespace fastdiff
