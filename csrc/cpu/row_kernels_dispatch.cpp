// Run-time choice of the row-kernel variant (isa_select.h: the widest one this CPU runs, or the one
// named by LLM2CLIP_CPU_ISA), with the same rule as the CLIP epilogue's.
#include "row_kernels.h"
#include "isa_select.h"

namespace llm2clip_cpu {

const RowKernels& row_kernels() {
  return select_isa_variant<RowKernels>(isa_avx512::row_kernels, isa_avx2::row_kernels,
                                        isa_default::row_kernels);
}

}  // namespace llm2clip_cpu
