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
         uintptr_t shift, double eps, bool silu, int wb_dtype, int cond_dtype, int64_t add_rs,
         int64_t scale_rs, int64_t shift_rs, uintptr_t workspace, int64_t workspace_floats,
         uintptr_t stream) -> int64_t {
        GroupNormArgs a =
            make_args(x, y, N, C, HW, G, nhwc, dtype, weight, bias, add, scale, shift, eps, silu);
        a.wb_dtype = wb_dtype;
        a.cond_dtype = cond_dtype;
        a.add_rs = add_rs;
        a.scale_rs = scale_rs;
        a.shift_rs = shift_rs;
        const int64_t need = group_norm_silu_cuda_workspace(a);
        if (need > workspace_floats) return need;  // nothing launched: allocate, call again
        a.workspace = workspace;
        a.workspace_floats = workspace_floats;
        pybind11::gil_scoped_release release;
        group_norm_silu_cuda(a, stream);
        return 0;
      },
      "Fused GroupNorm+SiLU on CUDA: the arguments of group_norm_silu_cpu, then the dtype codes "
      "of weight/bias and of add/scale/shift, the row strides of add/scale/shift, an fp32 "
      "workspace (address, floats) and a stream. Returns 0 after launching, or, launching "
      "nothing, the workspace floats this call needs when more than given (the split plan).");
#endif
}

}  // namespace fastdiff
