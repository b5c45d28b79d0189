// Run-time choice of the row-kernel variant: the widest one this CPU runs, or the one named by
// LLM2CLIP_CPU_ISA, with the same rules as the CLIP epilogue's choice (clip_epilogue_dispatch.cpp).
#include "row_kernels.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace llm2clip_cpu {
namespace {

bool cpu_runs(const std::string& name) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (name == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return name == "default";
}

const RowKernels* variant(const std::string& name) {
  if (name == "avx512") return isa_avx512::row_kernels();
  if (name == "avx2") return isa_avx2::row_kernels();
  if (name == "default") return isa_default::row_kernels();
  return nullptr;
}

}  // namespace

const RowKernels& row_kernels() {
  const char* forced = std::getenv("LLM2CLIP_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    const std::string name(forced);
    const RowKernels* k = variant(name);
    TORCH_CHECK(name == "avx512" || name == "avx2" || name == "default",
                "LLM2CLIP_CPU_ISA must be one of avx512, avx2, default; got '", name, "'");
    TORCH_CHECK(k != nullptr, "LLM2CLIP_CPU_ISA=", name, ": this build of llm2clip_fast._C has no ", name,
                " variant (x86-64 GCC builds have all three)");
    TORCH_CHECK(cpu_runs(name), "LLM2CLIP_CPU_ISA=", name, ": this CPU does not support ", name);
    return *k;
  }
  for (const char* name : {"avx512", "avx2"}) {
    const RowKernels* k = variant(name);
    if (k != nullptr && cpu_runs(name)) return *k;
  }
  return *isa_default::row_kernels();
}

}  // namespace llm2clip_cpu
