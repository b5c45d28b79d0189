// Fused SigLIP loss on CPU: row chunks of the logit matrix through at::mm, an OpenMP epilogue
// that turns each chunk into loss sums (forward), the unweighted pair gradient (backward), or both
// in one pass (siglip_loss_fused: the loss and its gradients for a mean or sum reduction from one
// GEMM per chunk, 6 M N D FLOPs in all; the caller scales the gradients by the upstream gradient).
//
// Logits z_ij = scale * <image_i, text_j> + bias; the positive of image row i is text column
// i + offset (offset = this rank's first global row in distributed mode, else 0); the pair term is
// softplus(-y_ij z_ij), y = +1 for the positive and -1 otherwise. Memory: one chunk_rows x N
// workspace, never the M x N matrix.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>


namespace {

// exp(x) for x <= 0 in float, written without libm calls so the column loop vectorises
// (Cephes expf polynomial, |rel err| < 2e-7). x below -87 is clamped: its exp is below float's
// normal range and contributes nothing a float sum could hold anyway.
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const int32_t k = static_cast<int32_t>(t - 0.5f);  // round to nearest for t <= 0 (truncation)
  const float kf = static_cast<float>(k);
  const float r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (k + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
}

// log(1 + e) for e in [0, 1] via 2*atanh(e / (2 + e)): no cancellation for tiny e (where
// log(1 + e) in float returns 0), and the series converges fast since the argument is <= 1/3.
inline float log1p_unit(float e) {
  const float s = e / (2.0f + e);
  const float s2 = s * s;
  float p = 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

struct FloatMath {
  static inline float softplus(float x) {
    return (x > 0.0f ? x : 0.0f) + log1p_unit(exp_nonpos(-std::fabs(x)));
  }
  static inline float sigmoid(float x) {
    const float e = exp_nonpos(-std::fabs(x));
    const float inv = 1.0f / (1.0f + e);
    return x >= 0.0f ? inv : e * inv;
  }
};

// float64 serves gradcheck: exactness over speed.
struct DoubleMath {
  static inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }
  static inline double sigmoid(double x) {
    const double e = std::exp(-std::fabs(x));
    return x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
  }
};

template <typename opmath_t>
struct MathFor;
template <>
struct MathFor<float> : FloatMath {};
template <>
struct MathFor<double> : DoubleMath {};

void check_inputs(const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale,
                  const at::Tensor& bias, int64_t chunk_rows) {
  TORCH_CHECK(image.device().is_cpu() && text.device().is_cpu(), "siglip_loss (C++): tensors must be on cpu");
  TORCH_CHECK(image.dim() == 2 && text.dim() == 2, "siglip_loss (C++): image and text must be 2-D, got ",
              image.sizes(), " and ", text.sizes());
  TORCH_CHECK(image.size(1) == text.size(1), "siglip_loss (C++): feature sizes differ: ", image.size(1), " vs ",
              text.size(1));
  TORCH_CHECK(image.scalar_type() == text.scalar_type(), "siglip_loss (C++): image and text dtypes differ");
  TORCH_CHECK(scale.numel() == 1 && bias.numel() == 1, "siglip_loss (C++): scale and bias must be scalars");
  TORCH_CHECK(chunk_rows > 0, "siglip_loss (C++): chunk_rows must be positive, got ", chunk_rows);
}

// Row chunks (chunk_rows x N) of the logit matrix, scale applied later in the epilogue.
template <typename Fn>
void for_each_chunk(const at::Tensor& image, const at::Tensor& text_t, int64_t chunk_rows, Fn&& fn) {
  const int64_t M = image.size(0);
  const int64_t N = text_t.size(1);
  at::Tensor work = at::empty({std::min(chunk_rows, std::max<int64_t>(M, 1)), N}, image.options());
  for (int64_t r0 = 0; r0 < M; r0 += chunk_rows) {
    const int64_t r1 = std::min(M, r0 + chunk_rows);
    at::Tensor dots = work.narrow(0, 0, r1 - r0);
    at::mm_out(dots, image.narrow(0, r0, r1 - r0), text_t);
    fn(r0, r1, dots);
  }
}

// Row sums of softplus(-y z) for one logit chunk; every pair is first treated as a negative (a
// branch-free loop that vectorises), then the one positive per row is swapped in.
template <typename scalar_t>
void forward_chunk(const scalar_t* d, int64_t r0, int64_t r1, int64_t N, int64_t offset, double scale, double bias,
                   at::opmath_type<scalar_t>* out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Math = MathFor<opmath_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
  const opmath_t b = static_cast<opmath_t>(bias);
  at::parallel_for(r0, r1, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const scalar_t* row = d + (i - r0) * N;
      double total = 0.0;
      // Float blocks vectorise; their sums go into a double so long rows stay accurate.
      constexpr int64_t kBlock = 1024;
      for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
        const int64_t j1 = std::min(N, j0 + kBlock);
        opmath_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t j = j0; j < j1; ++j) {
          acc += Math::softplus(s * static_cast<opmath_t>(row[j]) + b);
        }
        total += acc;
      }
      const int64_t pos = i + offset;
      if (pos >= 0 && pos < N) {
        const opmath_t z = s * static_cast<opmath_t>(row[pos]) + b;
        total += static_cast<double>(Math::softplus(-z)) - static_cast<double>(Math::softplus(z));
      }
      out[i] = static_cast<opmath_t>(total);
    }
  });
}

at::Tensor siglip_loss_forward(const at::Tensor& image_in, const at::Tensor& text_in, const at::Tensor& scale,
                               const at::Tensor& bias, int64_t offset, int64_t chunk_rows) {
  check_inputs(image_in, text_in, scale, bias, chunk_rows);
  const at::Tensor image = image_in.contiguous();
  const at::Tensor text_t = text_in.t();  // mm takes the transposed view without a copy
  const int64_t M = image.size(0);
  const int64_t N = text_in.size(0);
  at::Tensor out = at::empty({M}, image.options().dtype(at::toOpMathType(image.scalar_type())));
  const double s = scale.item<double>();
  const double b = bias.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "siglip_loss_forward", [&] {
    auto* out_p = out.data_ptr<at::opmath_type<scalar_t>>();
    for_each_chunk(image, text_t, chunk_rows, [&](int64_t r0, int64_t r1, const at::Tensor& dots) {
      forward_chunk<scalar_t>(dots.const_data_ptr<scalar_t>(), r0, r1, N, offset, s, b, out_p);
    });
  });
  return out;
}

// Overwrites one logit chunk with the unweighted pair gradient g0 = d softplus(-y z) / dz =
// -y * sigmoid(-y z), in (-1, 1), and returns each row's weighted sum of g0 * <i, t> and of g0
// (the d(scale) and d(bias) partials); with WithLoss also each row's loss sum into loss_out
// (indexed by global row). Negatives first, branch-free; then the positive.
template <typename scalar_t, bool WithLoss>
void backward_chunk(scalar_t* d, int64_t r0, int64_t rows, int64_t N, int64_t offset, double scale, double bias,
                    const at::opmath_type<scalar_t>* w_p, bool uniform, double* row_ds, double* row_db,
                    at::opmath_type<scalar_t>* loss_out) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Math = MathFor<opmath_t>;
  const opmath_t s = static_cast<opmath_t>(scale);
  const opmath_t b = static_cast<opmath_t>(bias);
  at::parallel_for(0, rows, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* row = d + i * N;
      double gl_sum = 0.0, g_sum = 0.0, loss_sum = 0.0;
      const int64_t pos = r0 + i + offset;
      const bool has_pos = pos >= 0 && pos < N;
      const opmath_t l_pos = has_pos ? static_cast<opmath_t>(row[pos]) : opmath_t(0);
      constexpr int64_t kBlock = 1024;
      for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
        const int64_t j1 = std::min(N, j0 + kBlock);
        opmath_t acc_gl = 0, acc_g = 0, acc_loss = 0;
#pragma omp simd reduction(+ : acc_gl, acc_g, acc_loss)
        for (int64_t j = j0; j < j1; ++j) {
          const opmath_t l = static_cast<opmath_t>(row[j]);
          const opmath_t z = s * l + b;
          const opmath_t g0 = Math::sigmoid(z);
          row[j] = static_cast<scalar_t>(g0);
          acc_gl += g0 * l;
          acc_g += g0;
          if constexpr (WithLoss) acc_loss += Math::softplus(z);
        }
        gl_sum += acc_gl;
        g_sum += acc_g;
        loss_sum += acc_loss;
      }
      if (has_pos) {
        const opmath_t z = s * l_pos + b;
        const opmath_t g_neg = Math::sigmoid(z);
        const opmath_t g_pos = -Math::sigmoid(-z);
        row[pos] = static_cast<scalar_t>(g_pos);
        gl_sum += static_cast<double>(g_pos - g_neg) * static_cast<double>(l_pos);
        g_sum += static_cast<double>(g_pos - g_neg);
        if constexpr (WithLoss) {
          loss_sum += static_cast<double>(Math::softplus(-z)) - static_cast<double>(Math::softplus(z));
        }
      }
      if constexpr (WithLoss) loss_out[r0 + i] = static_cast<opmath_t>(loss_sum);
      const double w = static_cast<double>(uniform ? w_p[0] : w_p[r0 + i]);
      row_ds[i] = w * gl_sum;
      row_db[i] = w * g_sum;
    }
  });
}

// The chunk loop of the gradient passes: per chunk the GEMM, backward_chunk, then the two
// gradient GEMMs. loss (WithLoss) receives each row's loss.
template <bool WithLoss>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_pass(
    const at::Tensor& image_in, const at::Tensor& text_in, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& row_weight, int64_t offset, int64_t chunk_rows, at::Tensor* loss) {
  check_inputs(image_in, text_in, scale, bias, chunk_rows);
  const at::Tensor image = image_in.contiguous();
  const at::Tensor text = text_in.contiguous();
  const int64_t M = image.size(0);
  const int64_t N = text.size(0);
  const int64_t D = image.size(1);
  TORCH_CHECK(row_weight.numel() == 1 || (row_weight.dim() == 1 && row_weight.size(0) == M),
              "siglip_loss_backward (C++): row_weight must be a scalar or have shape (", M, "), got ",
              row_weight.sizes());
  const auto acc_type = at::toOpMathType(image.scalar_type());
  const at::TensorOptions acc_opts = image.options().dtype(acc_type);
  const bool uniform = row_weight.numel() == 1;
  const at::Tensor weight = row_weight.to(acc_opts).reshape({-1}).contiguous();
  const double s = scale.item<double>();
  const double b = bias.item<double>();
  at::Tensor d_image = at::empty({M, D}, acc_opts);
  at::Tensor d_text = at::zeros({N, D}, acc_opts);
  if (WithLoss) *loss = at::empty({M}, acc_opts);
  double d_scale = 0.0;
  double d_bias = 0.0;
  std::vector<double> row_ds(std::min(chunk_rows, std::max<int64_t>(M, 1))),
      row_db(std::min(chunk_rows, std::max<int64_t>(M, 1)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "siglip_loss_backward", [&] {
    const auto* w_p = weight.const_data_ptr<at::opmath_type<scalar_t>>();
    auto* loss_p = WithLoss ? loss->mutable_data_ptr<at::opmath_type<scalar_t>>() : nullptr;
    for_each_chunk(image, text.t(), chunk_rows, [&](int64_t r0, int64_t r1, const at::Tensor& g) {
      const int64_t rows = r1 - r0;
      backward_chunk<scalar_t, WithLoss>(g.mutable_data_ptr<scalar_t>(), r0, rows, N, offset, s, b, w_p, uniform,
                                         row_ds.data(), row_db.data(), loss_p);
      for (int64_t i = 0; i < rows; ++i) {  // in row order: deterministic
        d_scale += row_ds[i];
        d_bias += row_db[i];
      }
      // The row weights go in after the GEMMs, so half precision never holds values of order 1/M.
      const at::Tensor img_c = image.narrow(0, r0, rows);
      if (uniform) {
        const at::Tensor ws = weight.mul(s);
        d_image.narrow(0, r0, rows).copy_(at::mm(g, text).to(acc_type).mul_(ws));
        d_text.add_(at::mm(g.t(), img_c).to(acc_type).mul_(ws));
      } else {
        const at::Tensor w_c = weight.narrow(0, r0, rows).unsqueeze(1);
        d_image.narrow(0, r0, rows).copy_(at::mm(g, text).to(acc_type).mul_(w_c).mul_(s));
        const at::Tensor weighted = img_c.to(acc_type).mul(w_c).to(image.scalar_type());
        d_text.add_(at::mm(g.t(), weighted).to(acc_type), s);
      }
    });
  });
  return {d_image, d_text, at::scalar_tensor(d_scale, acc_opts), at::scalar_tensor(d_bias, acc_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_backward(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale, const at::Tensor& bias,
    const at::Tensor& row_weight, int64_t offset, int64_t chunk_rows) {
  return gradient_pass<false>(image, text, scale, bias, row_weight, offset, chunk_rows, nullptr);
}

// One pass: each row's loss and the gradients of their plain sum (row weight 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> siglip_loss_fused(
    const at::Tensor& image, const at::Tensor& text, const at::Tensor& scale, const at::Tensor& bias,
    int64_t offset, int64_t chunk_rows) {
  at::Tensor loss;
  const at::Tensor one = at::ones({}, image.options().dtype(at::toOpMathType(image.scalar_type())));
  auto [d_image, d_text, d_scale, d_bias] =
      gradient_pass<true>(image, text, scale, bias, one, offset, chunk_rows, &loss);
  return {loss, d_image, d_text, d_scale, d_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm2clip_fast, m) {
  m.def("siglip_loss_forward(Tensor image, Tensor text, Tensor scale, Tensor bias, int offset, SymInt chunk_rows) -> Tensor");
  m.def(
      "siglip_loss_backward(Tensor image, Tensor text, Tensor scale, Tensor bias, Tensor row_weight, int offset, "
      "SymInt chunk_rows) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "siglip_loss_fused(Tensor image, Tensor text, Tensor scale, Tensor bias, int offset, SymInt chunk_rows) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llm2clip_fast, CPU, m) {
  m.impl("siglip_loss_forward", &siglip_loss_forward);
  m.impl("siglip_loss_backward", &siglip_loss_backward);
  m.impl("siglip_loss_fused", &siglip_loss_fused);
}
