// Placeholder until the logprobs kernels land.
#include "common.h"

namespace hcrlhf {
void register_logprobs(py::module_&) {}
}  // namespace hcrlhf
