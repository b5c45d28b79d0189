// Per-token int8 quantisation around an int8 GEMM (llm2clip_fast/models/w8a8.py) on the CPU: one
// pass per row where the same math as torch ops takes four (scale, abs, amax, round/clamp/cast).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "row_io.h"
#include "row_kernels.h"

namespace {

using llm2clip_cpu::check_rows;
using llm2clip_cpu::read_row;
using llm2clip_cpu::RowKernels;

at::Tensor optional_vector(const std::optional<at::Tensor>& t, int64_t n, const char* op, const char* name) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape (", n, "), got ", t->sizes());
  return t->to(at::kFloat).contiguous();
}

// x (M, K) -> (q int8 (M, K), scale float32 (M,)) with x * inv_smooth ~= q * scale per row:
// scale = max|x * inv_smooth| / 127 (rows of zeros get scale 1 and q = 0).
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, const std::optional<at::Tensor>& inv_smooth) {
  constexpr const char* op = "int8_quantize_rows_cpu";
  check_rows(x, op, "x");
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t m = x.size(0), n = x.size(1);
  const at::Tensor inv = optional_vector(inv_smooth, n, op, "inv_smooth");
  at::Tensor q = at::empty({m, n}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  const RowKernels& k = llm2clip_cpu::row_kernels();
  const float* ip = inv.defined() ? inv.const_data_ptr<float>() : nullptr;
  float* sp = scale.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  at::parallel_for(0, m, llm2clip_cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t i = begin; i < end; ++i) {
      const float* src = read_row(xc, i, row.data(), k);
      if (src != row.data()) std::copy(src, src + n, row.data());
      const float amax = k.scale_absmax_row(row.data(), ip, n);
      // amax == 0 (or below float's normal range): all-zero codes with a harmless scale.
      const bool tiny = !(amax >= std::numeric_limits<float>::min());
      sp[i] = tiny ? 1.0f : amax / 127.0f;
      k.quantize_row(row.data(), tiny ? 0.0f : 127.0f / amax, n, qp + i * n);
    }
  });
  return {q, scale};
}

// y (M, N) float32/bfloat16, in place: y[i] = y[i] * scale[i] + bias.
void scale_rows_(at::Tensor& y, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_scale_rows_cpu_";
  check_rows(y, op, "y");
  TORCH_CHECK(y.stride(1) == 1, op, ": y must have unit column stride");
  const int64_t m = y.size(0), n = y.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == m, op, ": scale must have shape (", m, "), got ", scale.sizes());
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const at::Tensor b = optional_vector(bias, n, op, "bias");
  const RowKernels& k = llm2clip_cpu::row_kernels();
  const float* sp = s.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  at::parallel_for(0, m, llm2clip_cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> row(n);
    for (int64_t i = begin; i < end; ++i) {
      float* buf = llm2clip_cpu::row_buffer(y, i, row.data());
      if (buf == row.data()) k.bf16_to_float(reinterpret_cast<const uint16_t*>(y.const_data_ptr<at::BFloat16>()) +
                                                 i * y.stride(0), buf, n);
      k.scale_bias_row(buf, sp[i], bp, n);
      llm2clip_cpu::write_row(y, i, buf, k);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm2clip_fast, m) {
  m.def("int8_quantize_rows_cpu(Tensor x, Tensor? inv_smooth) -> (Tensor, Tensor)");
  m.def("int8_scale_rows_cpu_(Tensor(a!) y, Tensor scale, Tensor? bias) -> ()");
}

TORCH_LIBRARY_IMPL(llm2clip_fast, CPU, m) {
  m.impl("int8_quantize_rows_cpu", &quantize_rows);
  m.impl("int8_scale_rows_cpu_", &scale_rows_);
}
