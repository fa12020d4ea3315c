// One registration function per op family; each lives in csrc/bind_<op>.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace fastdiff {
void register_sampler_step(pybind11::module_& m);
void register_group_norm(pybind11::module_& m);
void register_attention(pybind11::module_& m);
}  // namespace fastdiff
