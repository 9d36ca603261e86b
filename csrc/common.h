// Shared helpers for the hcrlhf C++ CPU kernels.
//
// Data crosses the boundary as numpy buffers (pybind11), never as torch tensors, so the
// extension builds without torch and survives torch upgrades. Strides are passed in elements.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace hcrlhf {

namespace py = pybind11;

// Element stride of a numpy array along `axis` (numpy reports byte strides).
inline int64_t elem_stride(const py::array& a, int axis) {
    return static_cast<int64_t>(a.strides(axis)) / static_cast<int64_t>(a.itemsize());
}

inline void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

}  // namespace hcrlhf
