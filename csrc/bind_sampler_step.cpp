// Placeholder: the sampler_step kernels register their entry points here.
#include "fastdiff/registry.h"

namespace fastdiff {
void register_sampler_step(pybind11::module_& m) { (void)m; }
}  // namespace fastdiff
