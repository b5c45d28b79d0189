// Fused CLIP loss primitives on CPU: row/column log-sum-exp of s * image @ text.T and the gradient
// that consumes them, holding at most what the caller's memory plan allows of the M x N logits.
//
// Rows are processed in chunks of C rows (chunk_rows from the Python plan, ops/_chunking.py): one
// at::mm fills a C x N buffer, then a fused epilogue (at::parallel_for) reduces it. Forward: exact row
// LSE per chunk plus per-thread column (max, sumexp) merged online across chunks, so one GEMM pass
// suffices. With keep_logits the chunks are the rows of an M x N output that the backward reads
// instead of recomputing (the keep-logits path: 6 M N D FLOPs in all, as a plain one-GEMM loss);
// without it one reused buffer (the recompute path: 8 M N D FLOPs, O((M + N) D) memory). Backward:
// the chunk's logits (kept or recomputed), then
//   G_ij = row_coef_i * exp(s*l_ij - row_lse_i) + col_coef_j * exp(s*l_ij - col_lse_j)
// (in place over a recomputed chunk, into a chunk buffer beside kept logits, which stay intact for a
// second backward), sum G*l for d_scale, then d_image[chunk] = s * G @ text and
// d_text += s * G.T @ image[chunk].
//
// The float epilogues are at::vec kernels compiled per instruction set (clip_epilogue_*.cpp) and
// chosen at run time, because the extension itself is built for the baseline ISA.
//
// bfloat16 inputs are multiplied as float32 copies (O((M + N) * D) extra memory): CPU bf16 GEMMs
// return bf16, and a logit rounded to bf16 is off by up to 2^-9 |l|, which at logit scale 100 moves
// exp(s * l) by up to 20%; a bf16 G then loses the small difference between the positive pair's
// probability and its target. ATen offers no bf16 GEMM with a float32 result on CPU.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "clip_epilogue.h"

namespace {

using llm2clip_cpu::kClipTileRows;

// ---- checks ------------------------------------------------------------------------------

void check_pair(const at::Tensor& image, const at::Tensor& text, const at::Tensor& logit_scale) {
  TORCH_CHECK(image.dim() == 2, "clip_lse: image must be 2-D (M, D), got shape ", image.sizes());
  TORCH_CHECK(text.dim() == 2, "clip_lse: text must be 2-D (N, D), got shape ", text.sizes());
  TORCH_CHECK(image.size(1) == text.size(1), "clip_lse: image and text must share D, got ", image.size(1),
              " and ", text.size(1));
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), "clip_lse: image and text must share a dtype, got ",
              image.scalar_type(), " and ", text.scalar_type());
  const auto st = image.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kDouble,
              "clip_lse: dtype must be float32, bfloat16 or float64, got ", st);
  TORCH_CHECK(image.device().is_cpu() && text.device().is_cpu() && logit_scale.device().is_cpu(),
              "clip_lse: the C++ backend serves CPU tensors");
  TORCH_CHECK(logit_scale.numel() == 1, "clip_lse: logit_scale must hold one value, got shape ",
              logit_scale.sizes());
}

int64_t chunk_rows_for(int64_t m, int64_t chunk_rows) {
  TORCH_CHECK(chunk_rows > 0, "clip_lse: chunk_rows must be positive, got ", chunk_rows);
  int64_t c = chunk_rows;
  // Multiples of the tile height keep the epilogue's tiles full.
  if (c > kClipTileRows) c -= c % kClipTileRows;
  return std::min(c, std::max<int64_t>(m, 1));
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// ---- forward -----------------------------------------------------------------------------

void forward_chunk_float(const at::Tensor& logits, float s, float* row_lse, float* cmax_all, float* csum_all,
                         int64_t n) {
  const int64_t rows = logits.size(0);
  const float* l = logits.data_ptr<float>();
  const auto& kernels = llm2clip_cpu::clip_epilogue();
  const int64_t tiles = (rows + kClipTileRows - 1) / kClipTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kClipTileRows;
      kernels.forward_tile(l + r0 * n, n, std::min(kClipTileRows, rows - r0), n, s, row_lse + r0, cmax_all + tid * n,
                           csum_all + tid * n);
    }
  });
}

void forward_chunk_double(const at::Tensor& logits, double s, double* row_lse, double* cmax_all, double* csum_all,
                          int64_t n) {
  const int64_t rows = logits.size(0);
  const double* l = logits.data_ptr<double>();
  at::parallel_for(0, rows, 16, [&](int64_t i0, int64_t i1) {
    const int tid = at::get_thread_num();
    double* cmax = cmax_all + tid * n;
    double* csum = csum_all + tid * n;
    for (int64_t i = i0; i < i1; ++i) {
      const double* li = l + i * n;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, s * li[j]);
      double acc = 0.0;
      for (int64_t j = 0; j < n; ++j) acc += std::exp(s * li[j] - m);
      row_lse[i] = m + std::log(acc);
      for (int64_t j = 0; j < n; ++j) {
        const double x = s * li[j];
        if (x > cmax[j]) {
          csum[j] = csum[j] * std::exp(cmax[j] - x) + 1.0;
          cmax[j] = x;
        } else {
          csum[j] += std::exp(x - cmax[j]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_forward(const at::Tensor& image_in, const at::Tensor& text_in,
                                                                const at::Tensor& logit_scale, int64_t chunk_rows,
                                                                bool keep_logits) {
  check_pair(image_in, text_in, logit_scale);
  const auto acc = acc_type(image_in.scalar_type());
  const at::Tensor image = image_in.to(acc).contiguous();
  const at::Tensor text = text_in.to(acc).contiguous();
  const int64_t m = image.size(0), n = text.size(0);
  auto opts = image.options().dtype(acc);
  at::Tensor row_lse = at::empty({m}, opts);
  at::Tensor kept = at::empty({keep_logits ? m : 0, n}, opts);
  if (m == 0 || n == 0) {
    return {row_lse.fill_(-std::numeric_limits<double>::infinity()),
            at::full({n}, -std::numeric_limits<double>::infinity(), opts), kept};
  }
  const int64_t threads = at::get_num_threads();
  at::Tensor cmax = at::full({threads, n}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor csum = at::zeros({threads, n}, opts);
  const int64_t c = chunk_rows_for(m, chunk_rows);
  at::Tensor buffer = keep_logits ? at::Tensor() : at::empty({c, n}, image.options());
  const at::Tensor text_t = text.t();
  const double s = logit_scale.item<double>();
  for (int64_t r0 = 0; r0 < m; r0 += c) {
    const int64_t rows = std::min(c, m - r0);
    at::Tensor logits = keep_logits ? kept.narrow(0, r0, rows) : buffer.narrow(0, 0, rows);
    at::mm_out(logits, image.narrow(0, r0, rows), text_t);
    if (acc == at::kDouble) {
      forward_chunk_double(logits, s, row_lse.data_ptr<double>() + r0, cmax.data_ptr<double>(),
                           csum.data_ptr<double>(), n);
    } else {
      forward_chunk_float(logits, static_cast<float>(s), row_lse.data_ptr<float>() + r0, cmax.data_ptr<float>(),
                          csum.data_ptr<float>(), n);
    }
  }
  // Threads that saw no rows hold (-inf, 0): log(0) = -inf drops them from the logsumexp.
  at::Tensor col_lse = at::logsumexp(cmax + at::log(csum), {0});
  return {row_lse, col_lse, kept};
}

// ---- backward ----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_backward(
    const at::Tensor& image_in, const at::Tensor& text_in, const at::Tensor& logit_scale, const at::Tensor& row_lse_in,
    const at::Tensor& col_lse_in, const at::Tensor& row_coef_in, const at::Tensor& col_coef_in,
    const at::Tensor& logits_in, int64_t chunk_rows) {
  check_pair(image_in, text_in, logit_scale);
  const auto acc = acc_type(image_in.scalar_type());
  const at::Tensor image = image_in.to(acc).contiguous();
  const at::Tensor text = text_in.to(acc).contiguous();
  const int64_t m = image.size(0), n = text.size(0), d = image.size(1);
  TORCH_CHECK(row_lse_in.numel() == m && row_coef_in.numel() == m,
              "clip_lse_backward: row_lse and row_coef must have M=", m, " elements");
  TORCH_CHECK(col_lse_in.numel() == n && col_coef_in.numel() == n,
              "clip_lse_backward: col_lse and col_coef must have N=", n, " elements");
  const at::Tensor row_lse = row_lse_in.to(acc).contiguous();
  const at::Tensor col_lse = col_lse_in.to(acc).contiguous();
  const at::Tensor row_coef = row_coef_in.to(acc).contiguous();
  const at::Tensor col_coef = col_coef_in.to(acc).contiguous();
  auto opts = image.options().dtype(acc);
  const bool kept = logits_in.numel() > 0;
  TORCH_CHECK(!kept || (logits_in.dim() == 2 && logits_in.size(0) == m && logits_in.size(1) == n &&
                        logits_in.scalar_type() == acc),
              "clip_lse_backward: logits must be empty (recompute) or the (", m, ", ", n, ") ", acc,
              " matrix clip_lse_forward kept, got ", logits_in.sizes(), " ", logits_in.scalar_type());
  if (m == 0 || n == 0) return {at::zeros({m, d}, opts), at::zeros({n, d}, opts), at::zeros({}, opts)};
  const at::Tensor logits = kept ? logits_in.contiguous() : logits_in;
  at::Tensor d_image = at::empty({m, d}, opts);
  at::Tensor d_text = at::empty({n, d}, opts);
  const int64_t c = chunk_rows_for(m, chunk_rows);
  at::Tensor buffer = at::empty({c, n}, image.options());
  const at::Tensor text_t = text.t();
  const double s = logit_scale.item<double>();
  double d_scale = 0.0;
  for (int64_t r0 = 0; r0 < m; r0 += c) {
    const int64_t rows = std::min(c, m - r0);
    at::Tensor g = buffer.narrow(0, 0, rows);
    const at::Tensor img_chunk = image.narrow(0, r0, rows);
    // Kept logits are read and G goes to the buffer; a recomputed chunk is overwritten in place.
    at::Tensor chunk = kept ? logits.narrow(0, r0, rows) : g;
    if (!kept) at::mm_out(g, img_chunk, text_t);
    std::vector<double> partial(rows, 0.0);
    if (acc == at::kDouble) {
      const double* l = chunk.data_ptr<double>();
      double* gd = g.data_ptr<double>();
      const double* rl = row_lse.data_ptr<double>() + r0;
      const double* rc = row_coef.data_ptr<double>() + r0;
      const double* cl = col_lse.data_ptr<double>();
      const double* cc = col_coef.data_ptr<double>();
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const double* li = l + i * n;
          double* gi = gd + i * n;
          double a = 0.0;
          for (int64_t j = 0; j < n; ++j) {
            const double x = s * li[j];
            const double gij = rc[i] * std::exp(x - rl[i]) + cc[j] * std::exp(x - cl[j]);
            a += gij * li[j];
            gi[j] = gij;
          }
          partial[i] = a;
        }
      });
    } else {
      const float* l = chunk.data_ptr<float>();
      float* gf = g.data_ptr<float>();
      const float* rl = row_lse.data_ptr<float>() + r0;
      const float* rc = row_coef.data_ptr<float>() + r0;
      const float* cl = col_lse.data_ptr<float>();
      const float* cc = col_coef.data_ptr<float>();
      const float sf = static_cast<float>(s);
      const auto& kernels = llm2clip_cpu::clip_epilogue();
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) partial[i] = kernels.grad_row(l + i * n, gf + i * n, n, sf, rl[i], rc[i], cl, cc);
      });
    }
    for (double p : partial) d_scale += p;
    // s goes in as the GEMMs' alpha (no extra passes over the gradients); beta = 0 ignores the
    // uninitialised d_image rows, and d_text on the first chunk.
    d_image.narrow(0, r0, rows).addmm_(g, text, /*beta=*/0.0, /*alpha=*/s);
    d_text.addmm_(g.t(), img_chunk, /*beta=*/r0 == 0 ? 0.0 : 1.0, /*alpha=*/s);
  }
  return {d_image, d_text, at::scalar_tensor(d_scale, opts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm2clip_fast, m) {
  m.def(
      "clip_lse_forward(Tensor image, Tensor text, Tensor logit_scale, SymInt chunk_rows, bool keep_logits) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "clip_lse_backward(Tensor image, Tensor text, Tensor logit_scale, Tensor row_lse, Tensor col_lse, "
      "Tensor row_coef, Tensor col_coef, Tensor logits, SymInt chunk_rows) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llm2clip_fast, CPU, m) {
  m.impl("clip_lse_forward", &clip_lse_forward);
  m.impl("clip_lse_backward", &clip_lse_backward);
}
