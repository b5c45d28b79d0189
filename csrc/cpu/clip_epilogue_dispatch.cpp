// Run-time choice of the CLIP epilogue variant: the widest one this CPU runs, or the one named by
// LLM2CLIP_CPU_ISA (how tests and benchmarks exercise the AVX2 path on an AVX-512 machine).
#include "clip_epilogue.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace llm2clip_cpu {
namespace {

bool cpu_has(const char* isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string name(isa);
  if (name == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(isa) == "default";
}

const ClipEpilogue* variant(const std::string& name) {
  if (name == "avx512") return isa_avx512::clip_epilogue();
  if (name == "avx2") return isa_avx2::clip_epilogue();
  if (name == "default") return isa_default::clip_epilogue();
  return nullptr;
}

}  // namespace

const ClipEpilogue& clip_epilogue() {
  const char* forced = std::getenv("LLM2CLIP_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    const std::string name(forced);
    const ClipEpilogue* k = variant(name);
    TORCH_CHECK(name == "avx512" || name == "avx2" || name == "default",
                "LLM2CLIP_CPU_ISA must be one of avx512, avx2, default; got '", name, "'");
    TORCH_CHECK(k != nullptr, "LLM2CLIP_CPU_ISA=", name, ": this build of llm2clip_fast._C has no ", name,
                " variant (x86-64 GCC builds have all three)");
    TORCH_CHECK(cpu_has(name.c_str()), "LLM2CLIP_CPU_ISA=", name, ": this CPU does not support ", name);
    return *k;
  }
  for (const char* name : {"avx512", "avx2"}) {
    const ClipEpilogue* k = variant(name);
    if (k != nullptr && cpu_has(name)) return *k;
  }
  return *isa_default::clip_epilogue();
}

}  // namespace llm2clip_cpu
