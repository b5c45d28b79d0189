// Row-wise fused element-wise kernels on float rows, compiled once per x86 instruction set and
// chosen at run time like the CLIP epilogues (clip_epilogue.h). Callers (adapter_cpu.cpp,
// int8_cpu.cpp) convert each row to a float scratch buffer with to_float / from_float and run the
// row functions on it: one pass over memory per op, vectorised by at::vec in the ISA builds.
#pragma once

#include <cstdint>

namespace llm2clip_cpu {

struct RowKernels {
  const char* isa;  // "avx512", "avx2" or "default"
  // bf16 <-> float (round to nearest even), n values.
  void (*bf16_to_float)(const uint16_t* src, float* dst, int64_t n);
  void (*float_to_bf16)(const float* src, uint16_t* dst, int64_t n);
  // LayerNorm forward of one row x (d): writes xhat = (x - mean) * rstd and a = xhat * g + b,
  // returns rstd = 1 / sqrt(var + eps) (two passes for mean and variance, as torch's LayerNorm).
  float (*layer_norm_row)(const float* x, const float* g, const float* b, int64_t d, float eps, float* xhat,
                          float* a);
  // LayerNorm backward of one row from xhat and rstd: dx = (g*dln - xhat*mean(xhat*g*dln) -
  // mean(g*dln)) * rstd [+ dres], a = xhat * g + b, and dg_acc += dln * xhat, db_acc += dln,
  // dres_acc += dres (dres and dres_acc may be null).
  void (*layer_norm_bwd_row)(const float* xhat, const float* dln, const float* dres, const float* g,
                             const float* b, float rstd, int64_t d, float* dx, float* a, float* dg_acc,
                             float* db_acc, float* dres_acc);
  // h = GELU(z) * keep * scale (exact erf GELU; keep may be null: no dropout).
  void (*gelu_row)(const float* z, const float* keep, float scale, int64_t n, float* h);
  // dz = dh * keep * scale * GELU'(z), h as gelu_row, and dz_acc += dz.
  void (*gelu_bwd_row)(const float* z, const float* dh, const float* keep, float scale, int64_t n, float* dz,
                       float* h, float* dz_acc);
  // x *= inv (inv may be null) in place, returns max |x|.
  float (*scale_absmax_row)(float* x, const float* inv, int64_t n);
  // q = round_half_even(x * r), |q| <= 127 (r = 127 / absmax).
  void (*quantize_row)(const float* x, float r, int64_t n, int8_t* q);
  // y = y * s + bias (bias may be null), in place.
  void (*scale_bias_row)(float* y, float s, const float* bias, int64_t n);
};

namespace isa_avx512 {
const RowKernels* row_kernels();  // nullptr where this build has no AVX-512 variant
}
namespace isa_avx2 {
const RowKernels* row_kernels();  // nullptr where this build has no AVX2 variant
}
namespace isa_default {
const RowKernels* row_kernels();
}

// The variant for this CPU, or the one named by LLM2CLIP_CPU_ISA, as clip_epilogue() chooses.
const RowKernels& row_kernels();

}  // namespace llm2clip_cpu
