// Python module for llm2clip_fast._C. The ops themselves are registered with the dispatcher
// (TORCH_LIBRARY_FRAGMENT(llm2clip_fast, ...)) in one file per op, so they are reachable as
// torch.ops.llm2clip_fast.* and can be checked with torch.library.opcheck.
#include <torch/extension.h>

#include "clip_epilogue.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

int omp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llm2clip_fast C++ CPU ops (registered as torch.ops.llm2clip_fast.*)";
  m.def("omp_max_threads", &omp_max_threads, "OpenMP threads available to the fused epilogues");
  m.def("has_openmp", &has_openmp, "whether the extension was compiled with OpenMP");
  m.def(
      "clip_epilogue_isa", [] { return std::string(llm2clip_cpu::clip_epilogue().isa); },
      "instruction set of the CLIP loss epilogue this process runs (honours LLM2CLIP_CPU_ISA)");
}
