// AVX2 build of the row kernels (row_kernels.h) (x86-64 with GCC only; run only where the CPU reports avx2 and fma).
#include "row_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "isa_target_avx2.h"
#include "row_kernels_impl.h"
#include "isa_target_end.h"
#else
namespace llm2clip_cpu::isa_avx2 {
const RowKernels* row_kernels() { return nullptr; }
}
#endif
