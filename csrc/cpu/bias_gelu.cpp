// CPU bias + GELU, forward and backward: one pass over memory, rows split across OpenMP threads.
#include <vector>

#include "cpu_common.h"

namespace fastbert {
namespace cpu {
namespace {

// y[r, :] = GELU(x[r, :] + bias) for rows [r0, r1). bias: float32 [cols] (zeros when absent).
template <typename T, int MODE>
FB_INLINE void gelu_fwd_rows(const T* x, const float* bias, T* y, int64_t r0, int64_t r1, int64_t cols) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) store_value(yr, c, gelu<MODE>(load_value(xr, c) + bias[c]));
  }
}

// dx[r, :] = dy * GELU'(x + bias); dbias_acc (this thread's float32 [cols] partial sums) += dx.
template <typename T, int MODE>
FB_INLINE void gelu_bwd_rows(const T* dy, const T* x, const float* bias, T* dx, float* dbias_acc, int64_t r0,
                             int64_t r1, int64_t cols) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* dyr = dy + r * cols;
    const T* xr = x + r * cols;
    T* dxr = dx + r * cols;
    if (dbias_acc != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        float g = load_value(dyr, c) * gelu_grad<MODE>(load_value(xr, c) + bias[c]);
        store_value(dxr, c, g);
        dbias_acc[c] += g;
      }
    } else {
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c)
        store_value(dxr, c, load_value(dyr, c) * gelu_grad<MODE>(load_value(xr, c) + bias[c]));
    }
  }
}

// The GELU mode's instantiation for one element type T (the void pointers hold T).
template <typename T>
FB_INLINE void gelu_fwd_any(int mode, const void* x, const float* bias, void* y, int64_t r0, int64_t r1,
                            int64_t cols) {
  auto xx = static_cast<const T*>(x);
  auto o = static_cast<T*>(y);
  if (mode == kGeluErf)
    gelu_fwd_rows<T, kGeluErf>(xx, bias, o, r0, r1, cols);
  else
    gelu_fwd_rows<T, kGeluTanh>(xx, bias, o, r0, r1, cols);
}

template <typename T>
FB_INLINE void gelu_bwd_any(int mode, const void* dy, const void* x, const float* bias, void* dx, float* acc,
                            int64_t r0, int64_t r1, int64_t cols) {
  auto d = static_cast<const T*>(dy);
  auto xx = static_cast<const T*>(x);
  auto o = static_cast<T*>(dx);
  if (mode == kGeluErf)
    gelu_bwd_rows<T, kGeluErf>(d, xx, bias, o, acc, r0, r1, cols);
  else
    gelu_bwd_rows<T, kGeluTanh>(d, xx, bias, o, acc, r0, r1, cols);
}

// One function per ISA variant; each selects the (dtype, mode) instantiation.
#define FB_GELU_VARIANT(SUFFIX, ATTR)                                                                        \
  ATTR void gelu_fwd_##SUFFIX(int dtype, int mode, const void* x, const float* bias, void* y, int64_t r0,     \
                              int64_t r1, int64_t cols) {                                                   \
    if (dtype == kFloat32)                                                                                   \
      gelu_fwd_any<float>(mode, x, bias, y, r0, r1, cols);                                                   \
    else                                                                                                     \
      gelu_fwd_any<bf16_t>(mode, x, bias, y, r0, r1, cols);                                                  \
  }                                                                                                          \
  ATTR void gelu_bwd_##SUFFIX(int dtype, int mode, const void* dy, const void* x, const float* bias, void* dx, \
                              float* acc, int64_t r0, int64_t r1, int64_t cols) {                           \
    if (dtype == kFloat32)                                                                                   \
      gelu_bwd_any<float>(mode, dy, x, bias, dx, acc, r0, r1, cols);                                         \
    else                                                                                                     \
      gelu_bwd_any<bf16_t>(mode, dy, x, bias, dx, acc, r0, r1, cols);                                        \
  }

FB_ISA_VARIANTS(FB_GELU_VARIANT)

void check_mode(int mode) {
  if (mode != kGeluErf && mode != kGeluTanh) throw std::invalid_argument("bias_gelu: unknown GELU mode");
}

}  // namespace

void bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, int dtype, int gelu_mode,
                   int num_threads) {
  check_dtype(dtype, "bias_gelu_fwd");
  check_sizes(rows, cols, "bias_gelu_fwd");
  check_mode(gelu_mode);
  if (rows == 0) return;
  std::vector<float> zeros;
  if (bias == nullptr) {
    zeros.assign(static_cast<size_t>(cols), 0.0f);
    bias = zeros.data();
  }
  const auto fn = FB_PICK_ISA(gelu_fwd);
  parallel_ranges(rows, threads_for(num_threads, rows, cols),
                  [&](int64_t r0, int64_t r1) { fn(dtype, gelu_mode, x, bias, y, r0, r1, cols); });
}

void bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias, int64_t rows,
                   int64_t cols, int dtype, int gelu_mode, int num_threads) {
  check_dtype(dtype, "bias_gelu_bwd");
  check_sizes(rows, cols, "bias_gelu_bwd");
  check_mode(gelu_mode);
  std::vector<float> zeros;
  if (bias == nullptr) {
    zeros.assign(static_cast<size_t>(cols), 0.0f);
    bias = zeros.data();
  }
  const auto fn = FB_PICK_ISA(gelu_bwd);
  const int nt = threads_for(num_threads, rows, cols);
  // Per-thread partial sums of dbias, summed below in a fixed order (deterministic, no atomics).
  std::vector<float> partial(dbias != nullptr ? static_cast<size_t>(nt) * cols : 0, 0.0f);
  int used = 1;
  if (rows > 0) {
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      const int n = omp_get_num_threads();
      if (tid == 0) used = n;
      int64_t r0, r1;
      row_range(rows, tid, n, &r0, &r1);
      fn(dtype, gelu_mode, dy, x, bias, dx, dbias != nullptr ? partial.data() + tid * cols : nullptr, r0, r1, cols);
    }
  }
  if (dbias != nullptr) {
    for (int64_t c = 0; c < cols; ++c) dbias[c] = 0.0f;
    for (int t = 0; t < used && rows > 0; ++t) {
      const float* p = partial.data() + t * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) dbias[c] += p[c];
    }
  }
}

}  // namespace cpu
}  // namespace fastbert
