// Declarations shared by the .cu files and bindings.cpp. Each op's .cu file defines its kernels
// and a host launcher; register_launchers (launchers.cpp) exposes the launchers to Python.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>

namespace llm2clip_fast_cuda {

void register_launchers(pybind11::module_& m);

// masked_mean_pool.cu: hidden (B, L, H) with unit stride along H, dtype code 0 fp32 / 1 fp16 / 2 bf16;
// mask (B, L) contiguous uint8; out (B, H) fp32; norm (B,) fp32 (pooled row's L2 norm before scaling).
void masked_mean_pool_launch(std::uintptr_t hidden, std::uintptr_t mask, std::uintptr_t out, std::uintptr_t norm,
                             int64_t B, int64_t L, int64_t H, int64_t stride_b, int64_t stride_l, int dtype,
                             bool normalize, double eps, std::uintptr_t stream_handle);

}  // namespace llm2clip_fast_cuda
