// The hcrlhf._C extension: each op file contributes a register_* function.
#include "common.h"

namespace hcrlhf {
void register_advantages(py::module_& m);
void register_logprobs(py::module_& m);
}  // namespace hcrlhf

PYBIND11_MODULE(_C, m) {
    m.doc() = "hcrlhf C++ CPU kernels (numpy-buffer interface; called through hcrlhf.ops)";
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    hcrlhf::register_advantages(m);
    hcrlhf::register_logprobs(m);
}
