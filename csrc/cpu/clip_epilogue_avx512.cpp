// AVX-512 build of the CLIP epilogues (x86-64 with GCC only; run only where the CPU reports avx512f/bw/vl/dq).
#include "clip_epilogue.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "isa_target_avx512.h"
#include "clip_epilogue_impl.h"
#include "isa_target_end.h"
#else
namespace llm2clip_cpu::isa_avx512 {
const ClipEpilogue* clip_epilogue() { return nullptr; }
}
#endif
