// CPU add + dropout + LayerNorm, forward and backward.
//
// Each thread owns a contiguous block of rows. A row is read once from memory into a float32 scratch
// row (it stays in L1/L2), then the statistics and outputs are computed from the scratch row. The
// backward pass regenerates the pre-norm sum h and the dropout mask instead of storing them, and
// reduces dweight/dbias/dx_bias through per-thread partial rows summed at the end (no atomics).
#include <cmath>
#include <vector>

#include "../common/dropout_hash.h"
#include "cpu_common.h"

namespace fastbert {
namespace cpu {
namespace {

struct DropoutSpec {
  uint64_t seed;
  uint32_t threshold;  // keep where dropout_hash >= threshold
  float scale;         // 1 / (1 - p)
};

// keep[c] = scale if element (row, c) survives dropout, else 0.
FB_INLINE void dropout_row(const DropoutSpec& d, int64_t row, int64_t cols, float* keep) {
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(cols);
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c)
    keep[c] = dropout_hash(d.seed, base + static_cast<uint64_t>(c)) >= d.threshold ? d.scale : 0.0f;
}

// h[c] = dropout(x + x_bias)[c] + residual[c] into the scratch row; returns sum(h).
template <typename T, bool HAS_RES, bool DROP>
FB_INLINE float pre_norm_row(const T* xr, const T* rr, const float* xb, const float* keep, int64_t cols, float* h) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < cols; ++c) {
    float v = load_value(xr, c) + xb[c];
    if constexpr (DROP) v *= keep[c];
    if constexpr (HAS_RES) v += load_value(rr, c);
    h[c] = v;
    sum += v;
  }
  return sum;
}

template <typename T, bool HAS_RES, bool DROP>
FB_INLINE void ln_fwd_rows(const T* x, const T* res, const float* w, const float* b, const float* xb, T* y,
                           float* mean, float* rstd, int64_t r0, int64_t r1, int64_t cols, float eps,
                           const DropoutSpec& d, float* h, float* keep) {
  const float inv_n = 1.0f / static_cast<float>(cols);
  for (int64_t r = r0; r < r1; ++r) {
    if constexpr (DROP) dropout_row(d, r, cols, keep);
    const float m = pre_norm_row<T, HAS_RES, DROP>(x + r * cols, HAS_RES ? res + r * cols : nullptr, xb, keep,
                                                   cols, h) * inv_n;
    // variance from the second pass over the cached row (no cancellation)
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t c = 0; c < cols; ++c) {
      const float dv = h[c] - m;
      ss += dv * dv;
    }
    const float rs = 1.0f / std::sqrt(ss * inv_n + eps);
    T* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) store_value(yr, c, (h[c] - m) * rs * w[c] + b[c]);
    mean[r] = m;
    rstd[r] = rs;
  }
}

// acc: this thread's partial rows [3][cols]: dweight, dbias, dx_bias.
template <typename T, bool HAS_RES, bool DROP>
FB_INLINE void ln_bwd_rows(const T* dy, const T* x, const T* res, const float* w, const float* xb,
                           const float* mean, const float* rstd, T* dx, T* dres, float* acc, int64_t r0,
                           int64_t r1, int64_t cols, const DropoutSpec& d, float* xhat, float* keep, float* g) {
  const float inv_n = 1.0f / static_cast<float>(cols);
  float* dw = acc;
  float* db = acc + cols;
  float* dxb = acc + 2 * cols;
  for (int64_t r = r0; r < r1; ++r) {
    if constexpr (DROP) dropout_row(d, r, cols, keep);
    const T* dyr = dy + r * cols;
    pre_norm_row<T, HAS_RES, DROP>(x + r * cols, HAS_RES ? res + r * cols : nullptr, xb, keep, cols, xhat);
    const float m = mean[r], rs = rstd[r];
    // xhat, the row sums of g = dy * w and g * xhat, and the dweight/dbias partials
    float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
    for (int64_t c = 0; c < cols; ++c) {
      const float xh = (xhat[c] - m) * rs;
      const float dyv = load_value(dyr, c);
      const float gc = dyv * w[c];
      g[c] = gc;  // stored rounded: g - mean(g) below then cancels exactly even where a*b+c is fused
      xhat[c] = xh;
      sg += gc;
      sgx += gc * xh;
      dw[c] += dyv * xh;
      db[c] += dyv;
    }
    const float a = sg * inv_n, bcoef = sgx * inv_n;
    // dh = rstd * (g - mean(g) - xhat * mean(g * xhat)); dx = dh * mask * scale
    T* dxr = dx + r * cols;
    T* drr = (HAS_RES && dres != nullptr) ? dres + r * cols : nullptr;  // null: caller reuses dx
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      const float dh = rs * ((g[c] - a) - xhat[c] * bcoef);
      if (HAS_RES && drr != nullptr) store_value(drr, c, dh);
      float dxv = dh;
      if constexpr (DROP) dxv *= keep[c];
      store_value(dxr, c, dxv);
      dxb[c] += dxv;
    }
  }
}

struct FwdArgs {
  const void* x;
  const void* res;
  const float* w;
  const float* b;
  const float* xb;
  void* y;
  float* mean;
  float* rstd;
  int64_t cols;
  float eps;
  DropoutSpec drop;
  int dtype;
};

struct BwdArgs {
  const void* dy;
  const void* x;
  const void* res;
  const float* w;
  const float* xb;
  const float* mean;
  const float* rstd;
  void* dx;
  void* dres;
  int64_t cols;
  DropoutSpec drop;
  int dtype;
  bool dropout;
};

template <typename T, bool HAS_RES, bool DROP>
FB_INLINE void fwd_typed(const FwdArgs& a, int64_t r0, int64_t r1, float* h, float* keep) {
  ln_fwd_rows<T, HAS_RES, DROP>(static_cast<const T*>(a.x), static_cast<const T*>(a.res), a.w, a.b, a.xb,
                                static_cast<T*>(a.y), a.mean, a.rstd, r0, r1, a.cols, a.eps, a.drop, h, keep);
}

template <typename T, bool HAS_RES, bool DROP>
FB_INLINE void bwd_typed(const BwdArgs& a, int64_t r0, int64_t r1, float* acc, float* xhat, float* keep, float* g) {
  ln_bwd_rows<T, HAS_RES, DROP>(static_cast<const T*>(a.dy), static_cast<const T*>(a.x),
                                static_cast<const T*>(a.res), a.w, a.xb, a.mean, a.rstd, static_cast<T*>(a.dx),
                                static_cast<T*>(a.dres), acc, r0, r1, a.cols, a.drop, xhat, keep, g);
}

// Expands to the 8 (dtype, residual?, dropout?) instantiations of FN<T, R, D>(ARGS...).
#define FB_LN_SELECT(FN, DTYPE, HAS_RES, DROP, ...)                      \
  do {                                                                  \
    if ((DTYPE) == kFloat32) {                                          \
      if (HAS_RES) {                                                    \
        if (DROP) FN<float, true, true>(__VA_ARGS__);                   \
        else FN<float, true, false>(__VA_ARGS__);                       \
      } else {                                                          \
        if (DROP) FN<float, false, true>(__VA_ARGS__);                  \
        else FN<float, false, false>(__VA_ARGS__);                      \
      }                                                                 \
    } else {                                                            \
      if (HAS_RES) {                                                    \
        if (DROP) FN<bf16_t, true, true>(__VA_ARGS__);                  \
        else FN<bf16_t, true, false>(__VA_ARGS__);                      \
      } else {                                                          \
        if (DROP) FN<bf16_t, false, true>(__VA_ARGS__);                 \
        else FN<bf16_t, false, false>(__VA_ARGS__);                     \
      }                                                                 \
    }                                                                   \
  } while (0)

#define FB_LN_VARIANT(SUFFIX, ATTR)                                                                    \
  ATTR void ln_fwd_##SUFFIX(const FwdArgs& a, int64_t r0, int64_t r1, float* h, float* keep) {          \
    FB_LN_SELECT(fwd_typed, a.dtype, a.res != nullptr, a.drop.threshold != 0, a, r0, r1, h, keep);     \
  }                                                                                                    \
  ATTR void ln_bwd_##SUFFIX(const BwdArgs& a, int64_t r0, int64_t r1, float* acc, float* xhat, float* keep, \
                            float* g) {                                                                \
    FB_LN_SELECT(bwd_typed, a.dtype, a.res != nullptr, a.drop.threshold != 0, a, r0, r1, acc, xhat, keep, g); \
  }

FB_ISA_VARIANTS(FB_LN_VARIANT)

DropoutSpec make_dropout(double p, uint64_t seed) {
  if (!(p >= 0.0 && p < 1.0)) throw std::invalid_argument("add_layer_norm: dropout_p must be in [0, 1)");
  return DropoutSpec{seed, p > 0.0 ? dropout_threshold(p) : 0u, p > 0.0 ? dropout_scale(p) : 1.0f};
}

}  // namespace

void add_layer_norm_fwd(const void* x, const void* residual, const float* weight, const float* bias,
                        const float* x_bias, void* y, float* mean, float* rstd, int64_t rows, int64_t cols,
                        int dtype, float eps, double dropout_p, uint64_t seed, int num_threads) {
  check_dtype(dtype, "add_layer_norm_fwd");
  check_sizes(rows, cols, "add_layer_norm_fwd");
  if (rows == 0) return;
  std::vector<float> zeros;
  if (bias == nullptr || x_bias == nullptr) zeros.assign(static_cast<size_t>(cols), 0.0f);
  const FwdArgs args{x,    residual, weight, bias ? bias : zeros.data(), x_bias ? x_bias : zeros.data(),
                     y,    mean,     rstd,   cols, eps, make_dropout(dropout_p, seed), dtype};
  const auto fn = FB_PICK_ISA(ln_fwd);
  parallel_ranges(rows, threads_for(num_threads, rows, cols), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(2 * static_cast<size_t>(cols));
    fn(args, r0, r1, scratch.data(), scratch.data() + cols);
  });
}

void add_layer_norm_bwd(const void* dy, const void* x, const void* residual, const float* weight,
                        const float* x_bias, const float* mean, const float* rstd, void* dx, void* dresidual,
                        float* dweight, float* dbias, float* dx_bias, int64_t rows, int64_t cols, int dtype,
                        double dropout_p, uint64_t seed, int num_threads) {
  check_dtype(dtype, "add_layer_norm_bwd");
  check_sizes(rows, cols, "add_layer_norm_bwd");
  std::vector<float> zeros;
  if (x_bias == nullptr) zeros.assign(static_cast<size_t>(cols), 0.0f);
  const BwdArgs args{dy,   x,    residual, weight, x_bias ? x_bias : zeros.data(), mean, rstd, dx, dresidual,
                     cols, make_dropout(dropout_p, seed), dtype, dropout_p > 0.0};
  const auto fn = FB_PICK_ISA(ln_bwd);
  const int nt = threads_for(num_threads, rows, cols);
  // partial[t] = thread t's [3][cols] sums of dweight, dbias, dx_bias
  std::vector<float> partial(static_cast<size_t>(nt) * 3 * cols, 0.0f);
  if (rows > 0) {
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      std::vector<float> scratch(3 * static_cast<size_t>(cols));
      int64_t r0, r1;
      row_range(rows, tid, omp_get_num_threads(), &r0, &r1);
      fn(args, r0, r1, partial.data() + static_cast<size_t>(tid) * 3 * cols, scratch.data(), scratch.data() + cols,
         scratch.data() + 2 * cols);
    }
  }
  float* outs[3] = {dweight, dbias, dx_bias};
  for (int k = 0; k < 3; ++k) {
    float* out = outs[k];
    if (out == nullptr) continue;
    for (int64_t c = 0; c < cols; ++c) out[c] = 0.0f;
    for (int t = 0; t < nt; ++t) {
      const float* p = partial.data() + (static_cast<size_t>(t) * 3 + k) * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) out[c] += p[c];
    }
  }
}

}  // namespace cpu
}  // namespace fastbert
