// Float epilogues of the fused CPU CLIP loss, compiled once per x86 instruction set and chosen at
// run time (the extension itself is built for the baseline ISA, where at::vec falls back to
// scalar loops). See clip_epilogue_impl.h for the kernels and clip_epilogue_dispatch.cpp for the
// choice.
#pragma once

#include <cstdint>

namespace llm2clip_cpu {

// Rows of one forward epilogue tile; the caller hands tiles of at most this many rows.
constexpr int64_t kClipTileRows = 16;

struct ClipEpilogue {
  const char* isa;  // "avx512", "avx2" or "default"
  // One tile of rows <= kClipTileRows rows of raw logits l (row stride ld, n columns), x = s * l:
  // writes row_lse[i] = log sum_j exp(x_ij) and merges the tile's column (max, sum exp(x - max))
  // into the running column statistics cmax/csum (n entries each).
  void (*forward_tile)(const float* l, int64_t ld, int64_t rows, int64_t n, float s, float* row_lse, float* cmax,
                       float* csum);
  // Writes into g (n entries; g may be l itself) the row of
  //   G_j = rc * exp(s*l_j - rl) + cc_j * exp(s*l_j - cl_j)
  // for one row of raw logits l, and returns sum_j G_j * l_j.
  double (*grad_row)(const float* l, float* g, int64_t n, float s, float rl, float rc, const float* cl,
                     const float* cc);
};

namespace isa_avx512 {
const ClipEpilogue* clip_epilogue();  // nullptr where this build has no AVX-512 variant
}
namespace isa_avx2 {
const ClipEpilogue* clip_epilogue();  // nullptr where this build has no AVX2 variant
}
namespace isa_default {
const ClipEpilogue* clip_epilogue();
}

// The variant for this CPU, or the one named by LLM2CLIP_CPU_ISA ("avx512", "avx2", "default"),
// which raises if this CPU or build cannot run it. Read on every call, so tests can switch it.
const ClipEpilogue& clip_epilogue();

}  // namespace llm2clip_cpu
