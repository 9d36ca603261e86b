// Placeholder until the advantages kernels land.
#include "common.h"

namespace hcrlhf {
void register_advantages(py::module_&) {}
}  // namespace hcrlhf
