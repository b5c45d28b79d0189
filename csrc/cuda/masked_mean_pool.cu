// Masked mean pooling (+ optional L2 normalisation) of (B, L, H) hidden states, fp32 accumulation.
//
// Kernel 1 (pool): grid (B, ceil(H / kThreads)). Each thread owns one column h of row b and walks
// the sequence; a warp reads kThreads consecutive columns of one position, so loads coalesce. The
// mask byte of a position is the same for every thread of the block (a broadcast read), and masked
// positions are skipped without touching their hidden values.
// Kernel 2 (norm): one block per row reduces the sum of squares of the pooled row, writes the norm
// (the autograd backward needs it) and rescales the row when normalisation was asked for.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "launchers.h"

namespace llm2clip_fast_cuda {
namespace {

constexpr int kThreads = 256;
// dtype codes of the hidden states, as passed by llm2clip_fast/ops/masked_mean_pool.py.
constexpr int kDtypeFloat32 = 0;
constexpr int kDtypeFloat16 = 1;
constexpr int kDtypeBFloat16 = 2;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void masked_mean_pool_kernel(const T* __restrict__ hidden, const uint8_t* __restrict__ mask,
                                        float* __restrict__ out, int64_t L, int64_t H, int64_t stride_b,
                                        int64_t stride_l) {
  const int64_t b = blockIdx.x;
  const int64_t h = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (h >= H) return;
  const T* row = hidden + b * stride_b + h;
  const uint8_t* mrow = mask + b * L;
  float acc = 0.0f;
  int64_t count = 0;
  for (int64_t l = 0; l < L; ++l) {
    if (mrow[l]) {
      acc += to_float(row[l * stride_l]);
      ++count;
    }
  }
  out[b * H + h] = acc / static_cast<float>(count > 0 ? count : 1);
}

__global__ void row_l2_norm_kernel(float* __restrict__ out, float* __restrict__ norm, int64_t H, bool normalize,
                                   float eps) {
  __shared__ float partial[kThreads];
  float* row = out + static_cast<int64_t>(blockIdx.x) * H;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < H; j += kThreads) ss += row[j] * row[j];
  partial[threadIdx.x] = ss;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  const float n = sqrtf(partial[0]);
  if (threadIdx.x == 0) norm[blockIdx.x] = n;
  if (normalize) {
    const float inv = 1.0f / fmaxf(n, eps);
    for (int64_t j = threadIdx.x; j < H; j += kThreads) row[j] *= inv;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("masked_mean_pool (CUDA): ") + what + ": " + cudaGetErrorString(err));
  }
}

}  // namespace

void masked_mean_pool_launch(std::uintptr_t hidden, std::uintptr_t mask, std::uintptr_t out, std::uintptr_t norm,
                             int64_t B, int64_t L, int64_t H, int64_t stride_b, int64_t stride_l, int dtype,
                             bool normalize, double eps, std::uintptr_t stream_handle) {
  if (B <= 0) return;
  if ((H + kThreads - 1) / kThreads > 65535) {
    throw std::invalid_argument("masked_mean_pool (CUDA): hidden size above 65535 * 256 (grid y limit)");
  }
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const auto* m = reinterpret_cast<const uint8_t*>(mask);
  auto* o = reinterpret_cast<float*>(out);
  if (H > 0) {
    // Rows on x (up to 2^31 - 1 blocks), column blocks on y (up to 65535).
    const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((H + kThreads - 1) / kThreads));
    switch (dtype) {
      case kDtypeFloat32:
        masked_mean_pool_kernel<float><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const float*>(hidden), m, o,
                                                                      L, H, stride_b, stride_l);
        break;
      case kDtypeFloat16:
        masked_mean_pool_kernel<__half><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const __half*>(hidden), m,
                                                                       o, L, H, stride_b, stride_l);
        break;
      case kDtypeBFloat16:
        masked_mean_pool_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
            reinterpret_cast<const __nv_bfloat16*>(hidden), m, o, L, H, stride_b, stride_l);
        break;
      default:
        throw std::invalid_argument("masked_mean_pool (CUDA): dtype code " + std::to_string(dtype) +
                                    " is not fp32 (0), fp16 (1) or bf16 (2)");
    }
    check(cudaGetLastError(), "pool kernel launch");
  }
  row_l2_norm_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(o, reinterpret_cast<float*>(norm), H,
                                                                        normalize, static_cast<float>(eps));
  check(cudaGetLastError(), "norm kernel launch");
}

}  // namespace llm2clip_fast_cuda
