// Exposes each op's host launcher (defined in its .cu file) to Python. One block per op.
#include "launchers.h"

namespace llm2clip_fast_cuda {

void register_launchers(pybind11::module_& m) {
  (void)m;  // ops add their m.def(...) here, next to the declaration of their launcher
}

}  // namespace llm2clip_fast_cuda
