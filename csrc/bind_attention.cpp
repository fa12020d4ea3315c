// Placeholder: the attention kernels register their entry points here.
#include "fastdiff/registry.h"

namespace fastdiff {
void register_attention(pybind11::module_& m) { (void)m; }
}  // namespace fastdiff
