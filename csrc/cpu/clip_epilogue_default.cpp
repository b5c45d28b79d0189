// Baseline build of the CLIP epilogues: any CPU the extension runs on (at::vec's generic
// Vectorized, which the compiler vectorises for the baseline ISA where it can).
#include "isa_prelude.h"
#define CPU_CAPABILITY DEFAULT
#define L2C_ISA_NS isa_default
#define L2C_ISA_NAME "default"
#include "clip_epilogue_impl.h"
