// Body of the row kernels (row_kernels.h), written with at::vec::Vectorized<float>. Included by one
// wrapper file per instruction set (row_kernels_avx512.cpp, _avx2.cpp, _default.cpp), each of which
// defines CPU_CAPABILITY (at::vec's namespace), L2C_ISA_NS and L2C_ISA_NAME first.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "row_kernels.h"

namespace llm2clip_cpu {
namespace L2C_ISA_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

inline Vec load(const float* p, int64_t count) { return count >= kV ? Vec::loadu(p) : Vec::loadu(p, count); }

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const c10::BFloat16*>(src);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    Vec v;
    at::vec::load_fp32_from_bf16(s + i, v);
    v.store(dst + i);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(s[i]);
}

void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  auto* d = reinterpret_cast<c10::BFloat16*>(dst);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    const Vec v = Vec::loadu(src + i);
    at::vec::convert_from_float<c10::BFloat16>(v, v).store(d + i, kV);
  }
  for (; i < n; ++i) d[i] = c10::BFloat16(src[i]);  // round to nearest even, as torch's casts
}

float layer_norm_row(const float* x, const float* g, const float* b, int64_t d, float eps, float* xhat,
                     float* a) {
  Vec acc(0.0f);
  for (int64_t j = 0; j < d; j += kV) {
    const int64_t c = std::min(kV, d - j);
    acc = acc + load(x + j, c);  // lanes past c load as 0
  }
  const float mean = hsum(acc) / static_cast<float>(d);
  const Vec vm(mean);
  Vec sq(0.0f);
  for (int64_t j = 0; j < d; j += kV) {
    const int64_t c = std::min(kV, d - j);
    Vec xc = load(x + j, c) - vm;
    if (c < kV) xc = Vec::set(Vec(0.0f), xc, c);
    sq = at::vec::fmadd(xc, xc, sq);
  }
  const float rstd = 1.0f / std::sqrt(hsum(sq) / static_cast<float>(d) + eps);
  const Vec vr(rstd);
  for (int64_t j = 0; j < d; j += kV) {
    const int64_t c = std::min(kV, d - j);
    const Vec xh = (load(x + j, c) - vm) * vr;
    xh.store(xhat + j, c);
    at::vec::fmadd(xh, load(g + j, c), load(b + j, c)).store(a + j, c);
  }
  return rstd;
}

void layer_norm_bwd_row(const float* xhat, const float* dln, const float* dres, const float* g, const float* b,
                        float rstd, int64_t d, float* dx, float* a, float* dg_acc, float* db_acc, float* dres_acc) {
  Vec s1(0.0f), s2(0.0f);
  for (int64_t j = 0; j < d; j += kV) {
    const int64_t c = std::min(kV, d - j);
    const Vec xh = load(xhat + j, c), dl = load(dln + j, c);
    const Vec wdy = dl * load(g + j, c);
    s1 = at::vec::fmadd(xh, wdy, s1);
    s2 = s2 + wdy;
    (load(dg_acc + j, c) + dl * xh).store(dg_acc + j, c);
    (load(db_acc + j, c) + dl).store(db_acc + j, c);
  }
  const Vec c1(hsum(s1) / static_cast<float>(d)), c2(hsum(s2) / static_cast<float>(d)), vr(rstd);
  for (int64_t j = 0; j < d; j += kV) {
    const int64_t c = std::min(kV, d - j);
    const Vec xh = load(xhat + j, c), gv = load(g + j, c);
    Vec v = (load(dln + j, c) * gv - (xh * c1 + c2)) * vr;
    if (dres != nullptr) {
      const Vec r = load(dres + j, c);
      v = v + r;
      (load(dres_acc + j, c) + r).store(dres_acc + j, c);
    }
    v.store(dx + j, c);
    at::vec::fmadd(xh, gv, load(b + j, c)).store(a + j, c);
  }
}

// GELU(z) = z * Phi(z) with Phi(z) = (1 + erf(z / sqrt 2)) / 2, and GELU'(z) = Phi(z) + z * phi(z).
// erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, the formula at::vec's own erf uses), whose
// exp(-z^2 / 2) is also phi's: one exp per element for both.
inline void gelu_parts(const Vec& z, Vec& cdf, Vec& e) {
  const Vec x = z * Vec(0.7071067811865476f);
  const Vec t = Vec(1.0f) / at::vec::fmadd(Vec(0.3275911f), x.abs(), Vec(1.0f));
  Vec poly(1.061405429f);
  poly = at::vec::fmadd(poly, t, Vec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
  poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  e = (Vec(-0.5f) * z * z).exp();
  const Vec erf_abs = Vec(1.0f) - poly * t * e;
  const Vec erf = Vec::blendv(erf_abs, Vec(0.0f) - erf_abs, z < Vec(0.0f));
  cdf = Vec(0.5f) * (Vec(1.0f) + erf);
}

void gelu_row(const float* z, const float* keep, float scale, int64_t n, float* h) {
  const Vec vs(scale);
  for (int64_t j = 0; j < n; j += kV) {
    const int64_t c = std::min(kV, n - j);
    const Vec zv = load(z + j, c);
    Vec cdf, e;
    gelu_parts(zv, cdf, e);
    Vec hv = zv * cdf;
    if (keep != nullptr) hv = hv * load(keep + j, c) * vs;
    hv.store(h + j, c);
  }
}

void gelu_bwd_row(const float* z, const float* dh, const float* keep, float scale, int64_t n, float* dz, float* h,
                  float* dz_acc) {
  const Vec vs(scale);
  for (int64_t j = 0; j < n; j += kV) {
    const int64_t c = std::min(kV, n - j);
    const Vec zv = load(z + j, c);
    Vec cdf, e;
    gelu_parts(zv, cdf, e);
    Vec hv = zv * cdf;
    Vec dv = load(dh + j, c);
    if (keep != nullptr) {
      const Vec k = load(keep + j, c) * vs;
      hv = hv * k;
      dv = dv * k;
    }
    const Vec dzv = dv * at::vec::fmadd(zv * e, Vec(0.3989422804014327f), cdf);
    hv.store(h + j, c);
    dzv.store(dz + j, c);
    (load(dz_acc + j, c) + dzv).store(dz_acc + j, c);  // lanes past c: dh loads as 0, so dz is 0
  }
}

float scale_absmax_row(float* x, const float* inv, int64_t n) {
  Vec m(0.0f);
  for (int64_t j = 0; j < n; j += kV) {
    const int64_t c = std::min(kV, n - j);
    Vec v = load(x + j, c);
    if (inv != nullptr) {
      v = v * load(inv + j, c);
      v.store(x + j, c);
    }
    m = at::vec::maximum(m, v.abs());  // lanes past c are 0
  }
  return hmax(m);
}

void quantize_row(const float* x, float r, int64_t n, int8_t* q) {
  const Vec vr(r), lo(-127.0f), hi(127.0f);
  alignas(64) float buf[kV];
  for (int64_t j = 0; j < n; j += kV) {
    const int64_t c = std::min(kV, n - j);
    // round() rounds half to even, as torch.round; the clamp only guards rounding at the max.
    at::vec::clamp(load(x + j, c) * vr, lo, hi).round().store(buf, c);
    for (int64_t k = 0; k < c; ++k) q[j + k] = static_cast<int8_t>(static_cast<int32_t>(buf[k]));
  }
}

void scale_bias_row(float* y, float s, const float* bias, int64_t n) {
  const Vec vs(s);
  for (int64_t j = 0; j < n; j += kV) {
    const int64_t c = std::min(kV, n - j);
    const Vec v = bias != nullptr ? at::vec::fmadd(load(y + j, c), vs, load(bias + j, c)) : load(y + j, c) * vs;
    v.store(y + j, c);
  }
}

const RowKernels kKernels{L2C_ISA_NAME,      &bf16_to_float, &float_to_bf16, &layer_norm_row, &layer_norm_bwd_row,
                          &gelu_row,         &gelu_bwd_row,  &scale_absmax_row, &quantize_row, &scale_bias_row};

}  // namespace

const RowKernels* row_kernels() { return &kKernels; }

}  // namespace L2C_ISA_NS
}  // namespace llm2clip_cpu
