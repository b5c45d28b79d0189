// Run-time choice of a per-ISA variant (the CLIP epilogues, the row kernels): the widest one this CPU
// runs, or the one LLM2CLIP_CPU_ISA names (how tests and benchmarks exercise the AVX2 path on an
// AVX-512 machine). One rule for every op built per ISA.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace llm2clip_cpu {

inline bool cpu_runs_isa(const std::string& name) {
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

// `avx512`, `avx2`, `fallback`: the variants' accessors (nullptr where the build has none; the
// fallback always exists).
template <class Table>
const Table& select_isa_variant(const Table* (*avx512)(), const Table* (*avx2)(), const Table* (*fallback)()) {
  auto variant = [&](const std::string& name) -> const Table* {
    if (name == "avx512") return avx512();
    if (name == "avx2") return avx2();
    if (name == "default") return fallback();
    return nullptr;
  };
  const char* forced = std::getenv("LLM2CLIP_CPU_ISA");
  if (forced != nullptr && forced[0] != '\0') {
    const std::string name(forced);
    const Table* k = variant(name);
    TORCH_CHECK(name == "avx512" || name == "avx2" || name == "default",
                "LLM2CLIP_CPU_ISA must be one of avx512, avx2, default; got '", name, "'");
    TORCH_CHECK(k != nullptr, "LLM2CLIP_CPU_ISA=", name, ": this build of llm2clip_fast._C has no ", name,
                " variant (x86-64 GCC builds have all three)");
    TORCH_CHECK(cpu_runs_isa(name), "LLM2CLIP_CPU_ISA=", name, ": this CPU does not support ", name);
    return *k;
  }
  for (const char* name : {"avx512", "avx2"}) {
    const Table* k = variant(name);
    if (k != nullptr && cpu_runs_isa(name)) return *k;
  }
  return *fallback();
}

}  // namespace llm2clip_cpu
