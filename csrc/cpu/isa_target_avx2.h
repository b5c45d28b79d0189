// Opens an AVX2 region of a per-ISA build file (x86-64 GCC only); isa_target_end.h closes it.
// Use: the baseline headers, this, the implementation header, isa_target_end.h.
#include "isa_prelude.h"
// push/pop: code the compiler adds at the end of the file (static initialisers, which run on
// every CPU at load time) is generated for the baseline ISA.
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c,lzcnt,popcnt")
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
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define L2C_ISA_NS isa_avx2
#define L2C_ISA_NAME "avx2"
