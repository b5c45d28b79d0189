// The element-wise work of the lean text adapter (llm2clip_fast/ops/adapter.py) on the CPU: one pass
// per op over float32 / bfloat16 rows, against the several passes (and fp32 temporaries) the same
// math costs as torch ops. The products stay torch.addmm/mm (oneDNN) on the Python side.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <optional>
#include <tuple>
#include <vector>

#include "row_io.h"
#include "row_kernels.h"

namespace {

using llm2clip_cpu::check_rows;
using llm2clip_cpu::read_row;
using llm2clip_cpu::row_buffer;
using llm2clip_cpu::RowKernels;
using llm2clip_cpu::write_row;

at::Tensor fp32_vector(const at::Tensor& t, int64_t d, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == d, op, ": ", name, " must have shape (", d, "), got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& gamma,
                                                              const at::Tensor& beta, double eps,
                                                              at::ScalarType cd) {
  constexpr const char* op = "adapter_layer_norm_fwd_cpu";
  check_rows(x, op, "x");
  TORCH_CHECK(llm2clip_cpu::is_row_dtype(cd), op, ": cd must be float32 or bfloat16, got ", cd);
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t m = x.size(0), d = x.size(1);
  const at::Tensor g = fp32_vector(gamma, d, op, "gamma"), b = fp32_vector(beta, d, op, "beta");
  at::Tensor xhat = at::empty({m, d}, x.options().dtype(cd));
  at::Tensor a = at::empty({m, d}, x.options().dtype(cd));
  at::Tensor rstd = at::empty({m}, x.options().dtype(at::kFloat));
  const RowKernels& k = llm2clip_cpu::row_kernels();
  const float* gp = g.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, m, llm2clip_cpu::row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<float> s0(d), s1(d), s2(d);
    for (int64_t i = begin; i < end; ++i) {
      float* xh = row_buffer(xhat, i, s1.data());
      float* ar = row_buffer(a, i, s2.data());
      rp[i] = k.layer_norm_row(read_row(xc, i, s0.data(), k), gp, bp, d, static_cast<float>(eps), xh, ar);
      write_row(xhat, i, xh, k);
      write_row(a, i, ar, k);
    }
  });
  return {xhat, rstd, a};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& xhat, const at::Tensor& rstd, const at::Tensor& gamma, const at::Tensor& beta,
    const at::Tensor& dln, const std::optional<at::Tensor>& dres, at::ScalarType dx_dtype) {
  constexpr const char* op = "adapter_layer_norm_bwd_cpu";
  check_rows(xhat, op, "xhat");
  check_rows(dln, op, "dln");
  TORCH_CHECK(llm2clip_cpu::is_row_dtype(dx_dtype), op, ": dx_dtype must be float32 or bfloat16, got ", dx_dtype);
  const int64_t m = xhat.size(0), d = xhat.size(1);
  TORCH_CHECK(dln.sizes() == xhat.sizes(), op, ": dln must match xhat ", xhat.sizes(), ", got ", dln.sizes());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == m && rstd.scalar_type() == at::kFloat, op,
              ": rstd must be float32 of shape (", m, ")");
  const at::Tensor xh = xhat.stride(1) == 1 ? xhat : xhat.contiguous();
  const at::Tensor dl = dln.stride(1) == 1 ? dln : dln.contiguous();
  std::optional<at::Tensor> dr;
  if (dres.has_value()) {
    check_rows(*dres, op, "dres");
    TORCH_CHECK(dres->sizes() == xhat.sizes(), op, ": dres must match xhat ", xhat.sizes(), ", got ", dres->sizes());
    dr = dres->stride(1) == 1 ? *dres : dres->contiguous();
  }
  const at::Tensor g = fp32_vector(gamma, d, op, "gamma"), b = fp32_vector(beta, d, op, "beta");
  at::Tensor dx = at::empty({m, d}, xhat.options().dtype(dx_dtype));
  at::Tensor a = at::empty({m, d}, xhat.options());
  const int threads = at::get_num_threads();
  at::Tensor dg_part = at::zeros({threads, d}, xhat.options().dtype(at::kFloat));
  at::Tensor db_part = at::zeros({threads, d}, xhat.options().dtype(at::kFloat));
  at::Tensor dres_part = at::zeros({dr.has_value() ? threads : 0, d}, xhat.options().dtype(at::kFloat));
  const RowKernels& k = llm2clip_cpu::row_kernels();
  const float* gp = g.const_data_ptr<float>();
  const float* bp = b.const_data_ptr<float>();
  const float* rp = rstd.const_data_ptr<float>();
  at::parallel_for(0, m, llm2clip_cpu::row_grain(d), [&](int64_t begin, int64_t end) {
    const int64_t t = at::get_thread_num();
    float* dg = dg_part.data_ptr<float>() + t * d;
    float* db = db_part.data_ptr<float>() + t * d;
    float* dres_acc = dr.has_value() ? dres_part.data_ptr<float>() + t * d : nullptr;
    std::vector<float> s0(d), s1(d), s2(d), s3(d), s4(d);
    for (int64_t i = begin; i < end; ++i) {
      const float* res = dr.has_value() ? read_row(*dr, i, s2.data(), k) : nullptr;
      float* dxr = row_buffer(dx, i, s3.data());
      float* ar = row_buffer(a, i, s4.data());
      k.layer_norm_bwd_row(read_row(xh, i, s0.data(), k), read_row(dl, i, s1.data(), k), res, gp, bp, rp[i], d, dxr,
                           ar, dg, db, dres_acc);
      write_row(dx, i, dxr, k);
      write_row(a, i, ar, k);
    }
  });
  // The residual gradient's column sums are the next Linear's bias gradient (empty without dres).
  at::Tensor dres_sum = dr.has_value() ? dres_part.sum(0) : at::empty({0}, xhat.options().dtype(at::kFloat));
  return {dx, a, dg_part.sum(0), db_part.sum(0), dres_sum};
}

at::Tensor keep_rows(const std::optional<at::Tensor>& keep, const at::Tensor& z, const char* op) {
  if (!keep.has_value()) return at::Tensor();
  check_rows(*keep, op, "keep");
  TORCH_CHECK(keep->sizes() == z.sizes(), op, ": keep must match z ", z.sizes(), ", got ", keep->sizes());
  return keep->stride(1) == 1 ? *keep : keep->contiguous();
}

at::Tensor gelu_fwd(const at::Tensor& z, const std::optional<at::Tensor>& keep, double scale) {
  constexpr const char* op = "adapter_gelu_fwd_cpu";
  check_rows(z, op, "z");
  const at::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
  const at::Tensor kp = keep_rows(keep, z, op);
  const int64_t m = z.size(0), n = z.size(1);
  at::Tensor h = at::empty({m, n}, z.options());
  const RowKernels& k = llm2clip_cpu::row_kernels();
  at::parallel_for(0, m, llm2clip_cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> s0(n), s1(n), s2(n);
    for (int64_t i = begin; i < end; ++i) {
      float* hr = row_buffer(h, i, s2.data());
      k.gelu_row(read_row(zc, i, s0.data(), k), kp.defined() ? read_row(kp, i, s1.data(), k) : nullptr,
                 static_cast<float>(scale), n, hr);
      write_row(h, i, hr, k);
    }
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_bwd(const at::Tensor& z, const at::Tensor& dh,
                                            const std::optional<at::Tensor>& keep, double scale) {
  constexpr const char* op = "adapter_gelu_bwd_cpu";
  check_rows(z, op, "z");
  check_rows(dh, op, "dh");
  TORCH_CHECK(dh.sizes() == z.sizes(), op, ": dh must match z ", z.sizes(), ", got ", dh.sizes());
  const at::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
  const at::Tensor dhc = dh.stride(1) == 1 ? dh : dh.contiguous();
  const at::Tensor kp = keep_rows(keep, z, op);
  const int64_t m = z.size(0), n = z.size(1);
  at::Tensor dz = at::empty({m, n}, z.options());
  at::Tensor h = at::empty({m, n}, z.options());
  at::Tensor dz_part = at::zeros({at::get_num_threads(), n}, z.options().dtype(at::kFloat));
  const RowKernels& k = llm2clip_cpu::row_kernels();
  at::parallel_for(0, m, llm2clip_cpu::row_grain(n), [&](int64_t begin, int64_t end) {
    float* dz_acc = dz_part.data_ptr<float>() + at::get_thread_num() * n;
    std::vector<float> s0(n), s1(n), s2(n), s3(n), s4(n);
    for (int64_t i = begin; i < end; ++i) {
      float* dzr = row_buffer(dz, i, s3.data());
      float* hr = row_buffer(h, i, s4.data());
      k.gelu_bwd_row(read_row(zc, i, s0.data(), k), read_row(dhc, i, s1.data(), k),
                     kp.defined() ? read_row(kp, i, s2.data(), k) : nullptr, static_cast<float>(scale), n, dzr, hr,
                     dz_acc);
      write_row(dz, i, dzr, k);
      write_row(h, i, hr, k);
    }
  });
  return {dz, h, dz_part.sum(0)};  // dz's column sums: the bias gradient of the Linear before GELU
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm2clip_fast, m) {
  m.def("adapter_layer_norm_fwd_cpu(Tensor x, Tensor gamma, Tensor beta, float eps, ScalarType cd) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("adapter_layer_norm_bwd_cpu(Tensor xhat, Tensor rstd, Tensor gamma, Tensor beta, Tensor dln, "
        "Tensor? dres, ScalarType dx_dtype) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("adapter_gelu_fwd_cpu(Tensor z, Tensor? keep, float scale) -> Tensor");
  m.def("adapter_gelu_bwd_cpu(Tensor z, Tensor dh, Tensor? keep, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llm2clip_fast, CPU, m) {
  m.impl("adapter_layer_norm_fwd_cpu", &layer_norm_fwd);
  m.impl("adapter_layer_norm_bwd_cpu", &layer_norm_bwd);
  m.impl("adapter_gelu_fwd_cpu", &gelu_fwd);
  m.impl("adapter_gelu_bwd_cpu", &gelu_bwd);
}
