// Bindings of the attention kernels. The CUDA entry point exists only in CUDA builds; the CPU
// twin of the kernels' online-softmax arithmetic (fastdiff/attention_math.h) is always built so
// that the CPU test suite checks the row-update math the GPU runs. (The cpu backend itself is
// PyTorch's SDPA, not this twin.)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "fastdiff/attention_math.h"
#include "fastdiff/common.h"
#include "fastdiff/registry.h"
#ifdef FASTDIFF_WITH_CUDA
#include "fastdiff/attention_cuda.h"
#endif

namespace py = pybind11;

namespace fastdiff {
namespace {

// fp32, contiguous [B x H x L x D]: the tiled online-softmax forward, tile of `block` keys.
void attention_twin_cpu(uintptr_t q_addr, uintptr_t k_addr, uintptr_t v_addr, uintptr_t o_addr,
                        int64_t B, int64_t H, int64_t Lq, int64_t Lk, int64_t D, float scale,
                        int64_t block) {
  check_arg(B >= 1 && H >= 1 && Lq >= 1 && Lk >= 1 && D >= 1, "attention twin: empty input");
  check_arg(block >= 1, "attention twin: block must be >= 1");
  const float* Q = reinterpret_cast<const float*>(q_addr);
  const float* K = reinterpret_cast<const float*>(k_addr);
  const float* V = reinterpret_cast<const float*>(v_addr);
  float* O = reinterpret_cast<float*>(o_addr);
  const float scale_log2 = scale * attn::kLog2e;
  std::vector<float> s(block), acc(D);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const float* k = K + bh * Lk * D;
    const float* v = V + bh * Lk * D;
    for (int64_t i = 0; i < Lq; ++i) {
      const float* q = Q + (bh * Lq + i) * D;
      std::fill(acc.begin(), acc.end(), 0.f);
      float m = attn::neg_inf(), l = 0.f;
      for (int64_t n0 = 0; n0 < Lk; n0 += block) {
        const int64_t nb = std::min(block, Lk - n0);
        float tmax = attn::neg_inf();
        for (int64_t j = 0; j < nb; ++j) {
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot = fmaf(q[d], k[(n0 + j) * D + d], dot);
          s[j] = dot * scale_log2;
          tmax = fmaxf(tmax, s[j]);
        }
        const float mn = attn::row_new_max(m, tmax);
        const float ref = attn::row_ref(mn);
        const float alpha = attn::row_rescale(m, ref);
        m = mn;
        float sum = 0.f;
        for (int64_t j = 0; j < nb; ++j) {
          s[j] = attn::row_prob(s[j], ref);
          sum += s[j];
        }
        l = attn::row_sum(l, alpha, sum);
        for (int64_t d = 0; d < D; ++d) {
          float a = acc[d] * alpha;
          for (int64_t j = 0; j < nb; ++j) a = fmaf(s[j], v[(n0 + j) * D + d], a);
          acc[d] = a;
        }
      }
      const float inv = attn::row_inv_sum(l);
      float* o = O + (bh * Lq + i) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
    }
  }
}

#ifdef FASTDIFF_WITH_CUDA
void attention_forward_cuda_py(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, int64_t B,
                               int64_t H, int64_t Lq, int64_t Lk, int64_t D,
                               const std::vector<int64_t>& sq, const std::vector<int64_t>& sk,
                               const std::vector<int64_t>& sv, float scale, int dtype,
                               uintptr_t stream) {
  check_arg(sq.size() == 4 && sk.size() == 4 && sv.size() == 4,
            "attention: strides must have 4 entries each");
  py::gil_scoped_release release;
  attention_forward_cuda(q, k, v, o, B, H, Lq, Lk, D, sq.data(), sk.data(), sv.data(), scale,
                         dtype, stream);
}
#endif

}  // namespace

void register_attention(py::module_& m) {
  m.def("attention_twin_cpu", &attention_twin_cpu,
        "CPU twin of the CUDA attention kernels' online-softmax math (fp32, contiguous; tests)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("B"), py::arg("H"),
        py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("scale"), py::arg("block"));
#ifdef FASTDIFF_WITH_CUDA
  m.def("attention_forward_cuda", &attention_forward_cuda_py,
        "Fused attention forward on CUDA (fp16/bf16 tensor cores, fp32 simple path)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("B"), py::arg("H"),
        py::arg("Lq"), py::arg("Lk"), py::arg("D"), py::arg("sq"), py::arg("sk"), py::arg("sv"),
        py::arg("scale"), py::arg("dtype"), py::arg("stream"));
#endif
}

}  // namespace fastdiff
