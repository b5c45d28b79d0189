// pybind11 module llm2clip_fast._cuda: raw CUDA kernels behind plain pointers, sizes and a stream.
// No torch headers: the Python side validates tensors and passes data_ptr() and the stream handle.
#include <pybind11/pybind11.h>
#include <cuda_runtime_api.h>

#include "launchers.h"

namespace py = pybind11;

namespace {

py::dict runtime_info() {
  py::dict d;
  int runtime = 0, driver = 0, count = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  cudaError_t err = cudaGetDeviceCount(&count);
  d["runtime_version"] = runtime;
  d["driver_version"] = driver;
  d["device_count"] = err == cudaSuccess ? count : 0;
  d["error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
  // A failed query leaves a sticky error on some drivers; clear it so later calls see a clean state.
  cudaGetLastError();
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "llm2clip_fast raw CUDA kernels (pointers + sizes + stream handle; no torch headers)";
  m.def("runtime_info", &runtime_info,
        "CUDA runtime/driver versions, visible device count, and the error string if the query failed");
  llm2clip_fast_cuda::register_launchers(m);
}
