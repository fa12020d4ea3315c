// pybind11 entry points of fused GroupNorm(+add, +scale/shift)+SiLU (fastdiff/ops/group_norm_silu.py).
#include <cstdint>

#include "fastdiff/group_norm_math.h"
#include "fastdiff/registry.h"
#ifdef FASTDIFF_WITH_CUDA
#include "fastdiff/group_norm_cuda.h"
#endif

namespace fastdiff {
namespace {

GroupNormArgs make_args(uintptr_t x, uintptr_t y, int64_t N, int64_t C, int64_t HW, int64_t G,
                        bool nhwc, int dtype, uintptr_t weight, uintptr_t bias, uintptr_t add,
                        uintptr_t scale, uintptr_t shift, double eps, bool silu) {
  check_arg(N > 0 && C > 0 && HW > 0, "group_norm_silu: N, C and HW must be positive");
  check_arg(G > 0 && C % G == 0, "group_norm_silu: num_groups must divide C");
  check_arg(x != 0 && y != 0, "group_norm_silu: null x or y");
  to_dtype(dtype);
  return GroupNormArgs{x, y, N, C, HW, G, nhwc, dtype, weight, bias, add, scale, shift,
                       (float)eps, silu};
}

}  // namespace

void register_group_norm(pybind11::module_& m) {
  m.def(
      "group_norm_silu_cpu",
      [](uintptr_t x, uintptr_t y, int64_t N, int64_t C, int64_t HW, int64_t G, bool nhwc,
         int dtype, uintptr_t weight, uintptr_t bias, uintptr_t add, uintptr_t scale,
         uintptr_t shift, double eps, bool silu) {
        GroupNormArgs a =
            make_args(x, y, N, C, HW, G, nhwc, dtype, weight, bias, add, scale, shift, eps, silu);
        pybind11::gil_scoped_release release;
        group_norm_silu_cpu(a);
      },
      "Fused GroupNorm+SiLU on CPU: y = act(GN(x + add) * (1 + scale) + shift). x/y "
      "[N x C x HW] (nhwc=False) or [N x HW x C]; weight/bias [C], add/scale/shift [N x C] fp32 "
      "addresses or 0.");
#ifdef FASTDIFF_WITH_CUDA
  m.def(
      "group_norm_silu_cuda",
      [](uintptr_t x, uintptr_t y, int64_t N, int64_t C, int64_t HW, int64_t G, bool nhwc,
         int dtype, uintptr_t weight, uintptr_t bias, uintptr_t add, uintptr_t scale,
         uintptr_t shift, double eps, bool silu, uintptr_t workspace, int64_t workspace_floats,
         uintptr_t stream) {
        GroupNormArgs a =
            make_args(x, y, N, C, HW, G, nhwc, dtype, weight, bias, add, scale, shift, eps, silu);
        a.workspace = workspace;
        a.workspace_floats = workspace_floats;
        pybind11::gil_scoped_release release;
        group_norm_silu_cuda(a, stream);
      },
      "Fused GroupNorm+SiLU on CUDA (arguments of group_norm_silu_cpu, then an fp32 workspace "
      "of group_norm_silu_cuda_workspace(...) floats, then a stream).");
  m.def(
      "group_norm_silu_cuda_workspace",
      [](uintptr_t x, uintptr_t y, int64_t N, int64_t C, int64_t HW, int64_t G, bool nhwc,
         int dtype) {
        GroupNormArgs a = make_args(x, y, N, C, HW, G, nhwc, dtype, 0, 0, 0, 0, 0, 1e-5, true);
        return group_norm_silu_cuda_workspace(a);
      },
      "fp32 workspace elements group_norm_silu_cuda needs for these sizes and addresses.");
#endif
}

}  // namespace fastdiff
