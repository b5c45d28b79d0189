// Declarations shared by the .cu files and bindings.cpp. Each op's .cu file defines its kernels
// and a host launcher; register_launchers (launchers.cpp) exposes the launchers to Python.
#pragma once
#include <pybind11/pybind11.h>

namespace llm2clip_fast_cuda {

void register_launchers(pybind11::module_& m);

}  // namespace llm2clip_fast_cuda
