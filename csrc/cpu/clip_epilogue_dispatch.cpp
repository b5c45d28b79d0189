// Run-time choice of the CLIP epilogue variant (isa_select.h: the widest one this CPU runs, or the one
// named by LLM2CLIP_CPU_ISA).
#include "clip_epilogue.h"
#include "isa_select.h"

namespace llm2clip_cpu {

const ClipEpilogue& clip_epilogue() {
  return select_isa_variant<ClipEpilogue>(isa_avx512::clip_epilogue, isa_avx2::clip_epilogue,
                                          isa_default::clip_epilogue);
}

}  // namespace llm2clip_cpu
