// AVX-512 build of the row kernels (row_kernels.h) (x86-64 with GCC only; run only where the CPU reports avx512f/bw/vl/dq).
#include "row_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include "clip_epilogue_prelude.h"
// push/pop: code the compiler adds at the end of the file (static initialisers, which run on
// every CPU at load time) is generated for the baseline ISA.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c,lzcnt,popcnt")
// g++ does not define the ISA macros for a target pragma; sleef.h (pulled in by at::vec)
// declares its vector functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define L2C_ISA_NS isa_avx512
#define L2C_ISA_NAME "avx512"
#include "row_kernels_impl.h"
#pragma GCC pop_options
#else
namespace llm2clip_cpu::isa_avx512 {
const RowKernels* row_kernels() { return nullptr; }
}
#endif
