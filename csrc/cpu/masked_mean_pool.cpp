// Fused masked mean pooling (+ optional L2 normalisation) over a (B, L, H) hidden-state tensor.
//
// Pooling the LLM's last hidden states is memory-bound: each hidden value is read once and the
// mean of the masked positions is accumulated in fp32. Doing it in one pass avoids the fp32 copy of
// the whole (B, L, H) tensor that the plain torch formula (h.float() * mask).sum(1) materialises.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Columns of one work item: large enough to amortise the per-item loop over L, small enough that
// B * (H / kColumnBlock) items keep every thread busy when B is small.
constexpr int64_t kColumnBlock = 512;

template <typename scalar_t>
void pool_rows(const scalar_t* hidden, const uint8_t* mask, float* out, int64_t B, int64_t L, int64_t H,
               int64_t stride_b, int64_t stride_l) {
  const int64_t col_blocks = (H + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, B * col_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kColumnBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / col_blocks;
      const int64_t h0 = (item % col_blocks) * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, H - h0);
      std::fill(acc.begin(), acc.begin() + width, 0.0f);
      int64_t count = 0;
      const uint8_t* mrow = mask + b * L;
      for (int64_t l = 0; l < L; ++l) {
        if (!mrow[l]) continue;
        ++count;
        const scalar_t* src = hidden + b * stride_b + l * stride_l + h0;
        float* a = acc.data();
        for (int64_t j = 0; j < width; ++j) a[j] += static_cast<float>(src[j]);
      }
      const float inv = 1.0f / static_cast<float>(std::max<int64_t>(count, 1));
      float* dst = out + b * H + h0;
      for (int64_t j = 0; j < width; ++j) dst[j] = acc[j] * inv;
    }
  });
}

void norm_rows(float* out, float* norm, int64_t B, int64_t H, bool normalize, double eps) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* row = out + b * H;
      // double accumulation: the norm scales every output element, so its rounding matters most.
      double ss = 0.0;
      for (int64_t j = 0; j < H; ++j) ss += static_cast<double>(row[j]) * row[j];
      const float n = static_cast<float>(std::sqrt(ss));
      norm[b] = n;
      if (normalize) {
        const float inv = 1.0f / std::max(n, static_cast<float>(eps));
        for (int64_t j = 0; j < H; ++j) row[j] *= inv;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> masked_mean_pool_forward(const at::Tensor& hidden_states, const at::Tensor& mask,
                                                            bool normalize, double eps) {
  TORCH_CHECK(hidden_states.dim() == 3, "masked_mean_pool_forward: hidden_states must be (B, L, H), got ",
              hidden_states.sizes());
  TORCH_CHECK(mask.dim() == 2, "masked_mean_pool_forward: mask must be (B, L), got ", mask.sizes());
  const int64_t B = hidden_states.size(0), L = hidden_states.size(1), H = hidden_states.size(2);
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == L, "masked_mean_pool_forward: mask shape ", mask.sizes(),
              " does not match hidden_states ", hidden_states.sizes());
  TORCH_CHECK(hidden_states.device().is_cpu() && mask.device().is_cpu(),
              "masked_mean_pool_forward (C++ CPU): tensors must be on cpu");
  TORCH_CHECK(mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte,
              "masked_mean_pool_forward: mask must be bool or uint8, got ", mask.scalar_type());
  // Rows are read with unit stride; batch and sequence strides are honoured as they are.
  at::Tensor h = hidden_states.stride(2) == 1 ? hidden_states : hidden_states.contiguous();
  at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty({B, H}, hidden_states.options().dtype(at::kFloat));
  at::Tensor norm = at::empty({B}, hidden_states.options().dtype(at::kFloat));
  if (B == 0) return {out, norm};
  const uint8_t* mptr = reinterpret_cast<const uint8_t*>(m.data_ptr());
  if (H > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "masked_mean_pool_forward", [&] {
      pool_rows<scalar_t>(h.const_data_ptr<scalar_t>(), mptr, out.data_ptr<float>(), B, L, H, h.stride(0),
                          h.stride(1));
    });
  }
  norm_rows(out.data_ptr<float>(), norm.data_ptr<float>(), B, H, normalize, eps);
  return {out, norm};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llm2clip_fast, m) {
  m.def(
      "masked_mean_pool_forward(Tensor hidden_states, Tensor mask, bool normalize, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(llm2clip_fast, CPU, m) { m.impl("masked_mean_pool_forward", &masked_mean_pool_forward); }
