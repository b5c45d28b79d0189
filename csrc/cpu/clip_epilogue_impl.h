// Body of the CLIP float epilogues, written with at::vec::Vectorized<float>. Included by one
// wrapper file per instruction set (clip_epilogue_avx512.cpp, _avx2.cpp, _default.cpp), each of
// which defines CPU_CAPABILITY (at::vec's namespace), L2C_ISA_NS and L2C_ISA_NAME first.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "clip_epilogue.h"

namespace llm2clip_cpu {
namespace L2C_ISA_NS {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();
constexpr int64_t kTileCols = 512;  // columns per forward block: 16 x 512 floats stay in L1/L2
static_assert(kTileCols % 16 == 0, "kTileCols must be a multiple of every vector width");
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x), |rel err| < 2e-7 on [-87.3, 88.3], exactly 0 below -87.3 (so exp(-inf) = 0). The
// Cephes polynomial, inlined. Measured per logit on one core (AVX-512 / AVX2 path, forward):
// this 1.3 / 2.2 ns, Vectorized::exp() (a Sleef u10 call) 1.7 / 2.5 ns, Vectorized::exp_u20()
// 1.0 / 1.2 ns but 20 ulp. Every variant is far below the GEMM's ~50-100 ns per logit at D=512,
// so the 1-ulp one is kept; it also vectorises in the baseline build, where at::vec's exp
// falls back to std::exp per lane.
inline Vec vexp(const Vec& x) {
  const Vec lo(-87.3f), hi(88.3f);
  const Vec xc = at::vec::minimum(at::vec::maximum(x, lo), hi);
  const Vec n = at::vec::fmadd(xc, Vec(1.44269504088896341f), Vec(0.5f)).floor();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  const Vec y = at::vec::fmadd(p, r * r, r + Vec(1.0f));
  const auto bits = (at::vec::convert_to_int_of_same_size(n) + at::vec::Vectorized<int32_t>(127))
                    << at::vec::Vectorized<int32_t>(23);
  const Vec res = y * at::vec::cast<float>(bits);
  // Below the clamp the result is 0; NaN compares false everywhere and stays NaN through xc.
  return Vec::blendv(res, Vec(0.0f), x < lo);
}

inline float hmax(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Lanes [count, kV) of a partial vector hold `fill`; loads never read past count.
inline Vec load_part(const float* p, int64_t count, float fill) {
  if (count >= kV) return Vec::loadu(p);
  return Vec::set(Vec(fill), Vec::loadu(p, count), count);
}

// s * l on `count` lanes, -inf on the others (so they drop out of maxima and exp-sums).
inline Vec load_scaled(const float* p, int64_t count, const Vec& s) {
  if (count >= kV) return Vec::loadu(p) * s;
  return Vec::set(Vec(kNegInf), Vec::loadu(p, count) * s, count);
}

void forward_tile(const float* l, int64_t ld, int64_t rows, int64_t n, float s, float* row_lse, float* cmax,
                  float* csum) {
  alignas(64) float tmax[kTileCols];
  alignas(64) float tsum[kTileCols];
  float rmax[kClipTileRows], rsum[kClipTileRows], bmax[kClipTileRows];
  std::fill(rmax, rmax + rows, kNegInf);
  std::fill(rsum, rsum + rows, 0.0f);
  const Vec vs(s);
  for (int64_t c0 = 0; c0 < n; c0 += kTileCols) {
    const int64_t c = std::min(kTileCols, n - c0);
    // Pass 1: row maxima of the block and the tile's column maxima. Lanes past c in tmax/tsum
    // are scratch (-inf, later NaN) and never stored back.
    for (int64_t j = 0; j < c; j += kV) Vec(kNegInf).store(tmax + j);
    for (int64_t i = 0; i < rows; ++i) {
      const float* li = l + i * ld + c0;
      Vec m(kNegInf);
      for (int64_t j = 0; j < c; j += kV) {
        const Vec x = load_scaled(li + j, c - j, vs);
        m = at::vec::maximum(m, x);
        at::vec::maximum(Vec::loadu(tmax + j), x).store(tmax + j);
      }
      bmax[i] = hmax(m);
    }
    // Pass 2: the two exp-sums, each against its own maximum (no overflow, no total underflow).
    for (int64_t j = 0; j < c; j += kV) Vec(0.0f).store(tsum + j);
    for (int64_t i = 0; i < rows; ++i) {
      const float* li = l + i * ld + c0;
      const float nm = std::max(rmax[i], bmax[i]);
      const Vec vnm(nm);
      Vec acc(0.0f);
      for (int64_t j = 0; j < c; j += kV) {
        const Vec x = load_scaled(li + j, c - j, vs);
        acc = acc + vexp(x - vnm);
        (Vec::loadu(tsum + j) + vexp(x - Vec::loadu(tmax + j))).store(tsum + j);
      }
      rsum[i] = rsum[i] * std::exp(rmax[i] - nm) + hsum(acc);
      rmax[i] = nm;
    }
    // Pass 3: merge the tile's column statistics into the running ones.
    for (int64_t j = 0; j < c; j += kV) {
      const int64_t cnt = std::min(kV, c - j);
      const Vec cm = load_part(cmax + c0 + j, cnt, kNegInf);
      const Vec cs = load_part(csum + c0 + j, cnt, 0.0f);
      const Vec tm = Vec::loadu(tmax + j);
      const Vec nm = at::vec::maximum(cm, tm);
      const Vec merged = cs * vexp(cm - nm) + Vec::loadu(tsum + j) * vexp(tm - nm);
      nm.store(cmax + c0 + j, cnt);
      merged.store(csum + c0 + j, cnt);
    }
  }
  for (int64_t i = 0; i < rows; ++i) row_lse[i] = rmax[i] + std::log(rsum[i]);
}

double grad_row(const float* l, float* g_out, int64_t n, float s, float rl, float rc, const float* cl,
                const float* cc) {
  const Vec vs(s), vrl(rl), vrc(rc), zero(0.0f);
  double total = 0.0;
  // Float partial sums over blocks, summed in double: long rows stay accurate.
  constexpr int64_t kBlock = 1024;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(n, j0 + kBlock);
    Vec acc(0.0f);
    for (int64_t j = j0; j < j1; j += kV) {
      const int64_t cnt = std::min(kV, j1 - j);
      const Vec lv = load_part(l + j, cnt, 0.0f);
      const Vec x = lv * vs;
      Vec g = vrc * vexp(x - vrl) + load_part(cc + j, cnt, 0.0f) * vexp(x - load_part(cl + j, cnt, 0.0f));
      if (cnt < kV) g = Vec::set(zero, g, cnt);
      acc = at::vec::fmadd(g, lv, acc);
      g.store(g_out + j, cnt);
    }
    total += hsum(acc);
  }
  return total;
}

const ClipEpilogue kKernels{L2C_ISA_NAME, &forward_tile, &grad_row};

}  // namespace

const ClipEpilogue* clip_epilogue() { return &kKernels; }

}  // namespace L2C_ISA_NS
}  // namespace llm2clip_cpu
