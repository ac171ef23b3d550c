// The fastprobe._C module: each operation family registers its functions here.
// Arguments are raw data pointers, sizes and strides (in elements) from the Python
// layer, which validated them; every function releases the GIL while it runs.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
void bind_divergence(py::module_& m);
void bind_concepts(py::module_& m);
void bind_bridge(py::module_& m);
void bind_attention(py::module_& m);
void bind_dual_attention(py::module_& m);
}  // namespace fastprobe

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastprobe CPU kernels (torch-free; called through fastprobe.ops)";
  m.def("has_openmp", []() {
#ifdef FASTPROBE_OPENMP
    return true;
#else
    return false;
#endif
  });
  fastprobe::bind_divergence(m);
  fastprobe::bind_concepts(m);
  fastprobe::bind_bridge(m);
  fastprobe::bind_attention(m);
  fastprobe::bind_dual_attention(m);
}
