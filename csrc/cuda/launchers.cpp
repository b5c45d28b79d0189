// Exposes each op's host launcher (defined in its .cu file) to Python. One block per op.
#include "launchers.h"

namespace llm2clip_fast_cuda {

void register_launchers(pybind11::module_& m) {
  (void)m;  // ops add their m.def(...) here, next to the declaration of their launcher
  m.def("masked_mean_pool", &masked_mean_pool_launch, "masked mean pool (+ L2 norm) of (B, L, H) hidden states",
        pybind11::arg("hidden"), pybind11::arg("mask"), pybind11::arg("out"), pybind11::arg("norm"),
        pybind11::arg("B"), pybind11::arg("L"), pybind11::arg("H"), pybind11::arg("stride_b"),
        pybind11::arg("stride_l"), pybind11::arg("dtype"), pybind11::arg("normalize"), pybind11::arg("eps"),
        pybind11::arg("stream"));
}

}  // namespace llm2clip_fast_cuda
