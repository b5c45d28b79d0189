// Reading and writing one row of a 2-D float32 / bfloat16 tensor through a float scratch buffer,
// for the row-kernel ops (adapter_cpu.cpp, int8_cpu.cpp).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstring>

#include "row_kernels.h"

namespace llm2clip_cpu {

inline bool is_row_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; }

// Row i of t (2-D, unit column stride) as floats: a pointer into t itself for float32, else
// converted into scratch (n values).
inline const float* read_row(const at::Tensor& t, int64_t i, float* scratch, const RowKernels& k) {
  const int64_t n = t.size(1);
  if (t.scalar_type() == at::kFloat) return t.const_data_ptr<float>() + i * t.stride(0);
  k.bf16_to_float(reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()) + i * t.stride(0),
                  scratch, n);
  return scratch;
}

// Where to compute row i of t before write_row: t's own row for float32, else scratch.
inline float* row_buffer(at::Tensor& t, int64_t i, float* scratch) {
  return t.scalar_type() == at::kFloat ? t.data_ptr<float>() + i * t.stride(0) : scratch;
}

// Stores the row computed in the buffer row_buffer returned (a no-op for float32).
inline void write_row(at::Tensor& t, int64_t i, const float* buf, const RowKernels& k) {
  if (t.scalar_type() == at::kFloat) return;
  k.float_to_bf16(buf, reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()) + i * t.stride(0), t.size(1));
}

// Rows per parallel_for chunk: about at::internal::GRAIN_SIZE (32768) elements, as torch's own
// element-wise loops, so small tensors run on one thread instead of paying a barrier per op.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

inline void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on cpu");
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK(is_row_dtype(t.scalar_type()), op, ": ", name, " must be float32 or bfloat16, got ",
              t.scalar_type());
}

}  // namespace llm2clip_cpu
