// Fused CLIP loss primitives on CPU: row/column log-sum-exp of s * image @ text.T and the gradient
// that consumes them, without ever holding the M x N logit matrix.
//
// Rows are processed in chunks of C rows (C * N <= chunk_elements): one at::mm fills a C x N
// buffer, then a fused epilogue (at::parallel_for) reduces it. Forward: exact row LSE per chunk
// plus per-thread column (max, sumexp) merged online across chunks, so one GEMM pass suffices.
// Backward: recompute the chunk, overwrite it in place with
//   G_ij = row_coef_i * exp(s*l_ij - row_lse_i) + col_coef_j * exp(s*l_ij - col_lse_j),
// accumulate sum G*l for d_scale, then d_image[chunk] = G @ text and d_text += G.T @ image[chunk]
// (both scaled by s once at the end).
//
// The float epilogues are compiled for several instruction sets (target_clones) because the
// extension is built without -march flags; exp is a polynomial GCC can vectorise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTileRows = 16;   // rows of a forward epilogue tile
constexpr int64_t kTileCols = 512;  // columns of a forward epilogue tile (tile stays in L1/L2)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define L2C_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define L2C_MULTIVERSION
#endif

// exp(x) for float, ~1 ulp on [-87, 88], exactly 0 below -87.3 (so -inf gives 0). Branch-free so
// loops calling it vectorise (Cephes coefficients).
inline float exp_approx(float x) {
  const bool underflow = x < -87.3f;
  float xc = std::min(std::max(x, -87.3f), 88.3f);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : y * scale;
}

inline float bf16_bits_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  // Round to nearest even, like c10::BFloat16 (NaN handling aside: G is finite).
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ---- forward epilogue (float accumulation) -------------------------------------------------

L2C_MULTIVERSION
void load_scaled_f32(const float* src, int64_t ld, int64_t rows, int64_t cols, float s, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * kTileCols + j] = s * src[i * ld + j];
}

L2C_MULTIVERSION
void load_scaled_bf16(const uint16_t* src, int64_t ld, int64_t rows, int64_t cols, float s, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * kTileCols + j] = s * bf16_bits_to_float(src[i * ld + j]);
}

// Online row (max, sumexp) over one column block of a tile (rows x cols, leading dim kTileCols).
L2C_MULTIVERSION
void update_rows(const float* x, int64_t rows, int64_t cols, float* rmax, float* rsum) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* xi = x + i * kTileCols;
    float m = kNegInf;
    for (int64_t j = 0; j < cols; ++j) m = std::max(m, xi[j]);
    const float nm = std::max(rmax[i], m);
    float acc = 0.0f;
    for (int64_t j = 0; j < cols; ++j) acc += exp_approx(xi[j] - nm);
    rsum[i] = rsum[i] * exp_approx(rmax[i] - nm) + acc;
    rmax[i] = nm;
  }
}

// Column (max, sumexp) of one tile, merged into running column stats cmax/csum.
L2C_MULTIVERSION
void update_cols(const float* x, int64_t rows, int64_t cols, float* cmax, float* csum, float* tmax, float* tsum) {
  for (int64_t j = 0; j < cols; ++j) {
    tmax[j] = x[j];
    tsum[j] = 0.0f;
  }
  for (int64_t i = 1; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) tmax[j] = std::max(tmax[j], x[i * kTileCols + j]);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) tsum[j] += exp_approx(x[i * kTileCols + j] - tmax[j]);
  for (int64_t j = 0; j < cols; ++j) {
    const float nm = std::max(cmax[j], tmax[j]);
    csum[j] = csum[j] * exp_approx(cmax[j] - nm) + tsum[j] * exp_approx(tmax[j] - nm);
    cmax[j] = nm;
  }
}

// ---- backward epilogue (float accumulation) ------------------------------------------------

// Overwrites one row of logits with G and returns sum_j G_ij * l_ij.
L2C_MULTIVERSION
float grad_row_f32(float* l, int64_t n, float s, float rl, float rc, const float* cl, const float* cc) {
  float acc = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float x = s * l[j];
    const float g = rc * exp_approx(x - rl) + cc[j] * exp_approx(x - cl[j]);
    acc += g * l[j];
    l[j] = g;
  }
  return acc;
}

L2C_MULTIVERSION
float grad_row_bf16(uint16_t* l, int64_t n, float s, float rl, float rc, const float* cl, const float* cc) {
  float acc = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float lj = bf16_bits_to_float(l[j]);
    const float x = s * lj;
    const float g = rc * exp_approx(x - rl) + cc[j] * exp_approx(x - cl[j]);
    acc += g * lj;
    l[j] = float_to_bf16_bits(g);
  }
  return acc;
}

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

int64_t chunk_rows(int64_t m, int64_t n, int64_t chunk_elements) {
  TORCH_CHECK(chunk_elements > 0, "clip_lse: chunk_elements must be positive, got ", chunk_elements);
  int64_t c = std::max<int64_t>(1, chunk_elements / std::max<int64_t>(n, 1));
  // Multiples of the tile height keep the epilogue's tiles full.
  if (c > kTileRows) c -= c % kTileRows;
  return std::min(c, std::max<int64_t>(m, 1));
}

at::ScalarType acc_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

// ---- forward -----------------------------------------------------------------------------

void forward_chunk_float(const at::Tensor& logits, float s, float* row_lse, float* cmax_all, float* csum_all,
                         int64_t n) {
  const int64_t rows = logits.size(0);
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  const void* base = logits.data_ptr();
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    const int tid = at::get_thread_num();
    float* cmax = cmax_all + tid * n;
    float* csum = csum_all + tid * n;
    std::vector<float> scratch(kTileRows * kTileCols), tmax(kTileCols), tsum(kTileCols);
    float rmax[kTileRows], rsum[kTileRows];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kTileRows;
      const int64_t r = std::min(kTileRows, rows - r0);
      std::fill(rmax, rmax + r, kNegInf);
      std::fill(rsum, rsum + r, 0.0f);
      for (int64_t c0 = 0; c0 < n; c0 += kTileCols) {
        const int64_t c = std::min(kTileCols, n - c0);
        if (bf16) {
          load_scaled_bf16(static_cast<const uint16_t*>(base) + r0 * n + c0, n, r, c, s, scratch.data());
        } else {
          load_scaled_f32(static_cast<const float*>(base) + r0 * n + c0, n, r, c, s, scratch.data());
        }
        update_rows(scratch.data(), r, c, rmax, rsum);
        update_cols(scratch.data(), r, c, cmax + c0, csum + c0, tmax.data(), tsum.data());
      }
      for (int64_t i = 0; i < r; ++i) row_lse[r0 + i] = rmax[i] + std::log(rsum[i]);
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

std::tuple<at::Tensor, at::Tensor> clip_lse_forward(const at::Tensor& image_in, const at::Tensor& text_in,
                                                    const at::Tensor& logit_scale, int64_t chunk_elements) {
  check_pair(image_in, text_in, logit_scale);
  const at::Tensor image = image_in.contiguous();
  const at::Tensor text = text_in.contiguous();
  const int64_t m = image.size(0), n = text.size(0);
  const auto acc = acc_type(image.scalar_type());
  auto opts = image.options().dtype(acc);
  at::Tensor row_lse = at::empty({m}, opts);
  if (m == 0 || n == 0) {
    return {row_lse.fill_(-std::numeric_limits<double>::infinity()),
            at::full({n}, -std::numeric_limits<double>::infinity(), opts)};
  }
  const int64_t threads = at::get_num_threads();
  at::Tensor cmax = at::full({threads, n}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor csum = at::zeros({threads, n}, opts);
  const int64_t c = chunk_rows(m, n, chunk_elements);
  at::Tensor buffer = at::empty({c, n}, image.options());
  const at::Tensor text_t = text.t();
  const double s = logit_scale.item<double>();
  for (int64_t r0 = 0; r0 < m; r0 += c) {
    const int64_t rows = std::min(c, m - r0);
    at::Tensor logits = buffer.narrow(0, 0, rows);
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
  return {row_lse, col_lse};
}

// ---- backward ----------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_lse_backward(
    const at::Tensor& image_in, const at::Tensor& text_in, const at::Tensor& logit_scale, const at::Tensor& row_lse_in,
    const at::Tensor& col_lse_in, const at::Tensor& row_coef_in, const at::Tensor& col_coef_in,
    int64_t chunk_elements) {
  check_pair(image_in, text_in, logit_scale);
  const at::Tensor image = image_in.contiguous();
  const at::Tensor text = text_in.contiguous();
  const int64_t m = image.size(0), n = text.size(0), d = image.size(1);
  const auto acc = acc_type(image.scalar_type());
  TORCH_CHECK(row_lse_in.numel() == m && row_coef_in.numel() == m,
              "clip_lse_backward: row_lse and row_coef must have M=", m, " elements");
  TORCH_CHECK(col_lse_in.numel() == n && col_coef_in.numel() == n,
              "clip_lse_backward: col_lse and col_coef must have N=", n, " elements");
  const at::Tensor row_lse = row_lse_in.to(acc).contiguous();
  const at::Tensor col_lse = col_lse_in.to(acc).contiguous();
  const at::Tensor row_coef = row_coef_in.to(acc).contiguous();
  const at::Tensor col_coef = col_coef_in.to(acc).contiguous();
  auto opts = image.options().dtype(acc);
  at::Tensor d_image = at::empty({m, d}, opts);
  at::Tensor d_text = at::zeros({n, d}, opts);
  if (m == 0 || n == 0) {
    d_image.zero_();
    return {d_image, d_text, at::zeros({}, opts)};
  }
  const bool same_dtype = image.scalar_type() == acc;
  const int64_t c = chunk_rows(m, n, chunk_elements);
  at::Tensor buffer = at::empty({c, n}, image.options());
  const at::Tensor text_t = text.t();
  const double s = logit_scale.item<double>();
  double d_scale = 0.0;
  for (int64_t r0 = 0; r0 < m; r0 += c) {
    const int64_t rows = std::min(c, m - r0);
    at::Tensor g = buffer.narrow(0, 0, rows);
    const at::Tensor img_chunk = image.narrow(0, r0, rows);
    at::mm_out(g, img_chunk, text_t);
    std::vector<double> partial(rows, 0.0);
    if (acc == at::kDouble) {
      double* l = g.data_ptr<double>();
      const double* rl = row_lse.data_ptr<double>() + r0;
      const double* rc = row_coef.data_ptr<double>() + r0;
      const double* cl = col_lse.data_ptr<double>();
      const double* cc = col_coef.data_ptr<double>();
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          double* li = l + i * n;
          double a = 0.0;
          for (int64_t j = 0; j < n; ++j) {
            const double x = s * li[j];
            const double gij = rc[i] * std::exp(x - rl[i]) + cc[j] * std::exp(x - cl[j]);
            a += gij * li[j];
            li[j] = gij;
          }
          partial[i] = a;
        }
      });
    } else {
      const bool bf16 = g.scalar_type() == at::kBFloat16;
      void* l = g.data_ptr();
      const float* rl = row_lse.data_ptr<float>() + r0;
      const float* rc = row_coef.data_ptr<float>() + r0;
      const float* cl = col_lse.data_ptr<float>();
      const float* cc = col_coef.data_ptr<float>();
      const float sf = static_cast<float>(s);
      at::parallel_for(0, rows, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          partial[i] = bf16 ? grad_row_bf16(static_cast<uint16_t*>(l) + i * n, n, sf, rl[i], rc[i], cl, cc)
                            : grad_row_f32(static_cast<float*>(l) + i * n, n, sf, rl[i], rc[i], cl, cc);
        }
      });
    }
    for (double p : partial) d_scale += p;
    if (same_dtype) {
      at::Tensor d_image_rows = d_image.narrow(0, r0, rows);
      at::mm_out(d_image_rows, g, text);
      d_text.addmm_(g.t(), img_chunk);
    } else {
      // bf16 GEMMs are ~3x faster than fp32 here; their bf16 results are accumulated in fp32.
      d_image.narrow(0, r0, rows).copy_(at::mm(g, text));
      d_text.add_(at::mm(g.t(), img_chunk));
    }
  }
  d_image.mul_(s);
  d_text.mul_(s);
  return {d_image, d_text, at::scalar_tensor(d_scale, opts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm2clip_fast, m) {
  m.def("clip_lse_forward(Tensor image, Tensor text, Tensor logit_scale, int chunk_elements) -> (Tensor, Tensor)");
  m.def(
      "clip_lse_backward(Tensor image, Tensor text, Tensor logit_scale, Tensor row_lse, Tensor col_lse, "
      "Tensor row_coef, Tensor col_coef, int chunk_elements) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llm2clip_fast, CPU, m) {
  m.impl("clip_lse_forward", &clip_lse_forward);
  m.impl("clip_lse_backward", &clip_lse_backward);
}
