// CPU per-token int8 quantization and the dequantizing epilogue of an int8 GEMM (inference).
//
// quantize_rows:   scale[r] = max_c |x[r, c]| / 127 (1 for an all-zero row), q[r, c] = round(x[r, c] / scale[r])
//                  in [-127, 127], round half to even, stored as the byte q + zero_point (0: int8; 128: uint8,
//                  for oneDNN's u8 x s8 GEMMs); one pass per row (the row stays in L1 between the max and the
//                  rounding). x: fp32 or bf16. Both loops are branch-free so that they vectorize.
// dequantize_rows: y[r, c] = act(acc[r, c] * scale[r] + bias[c]), acc fp32 (the GEMM's output with the weight
//                  scales applied), act none / GELU (erf or tanh), y fp32 or bf16; one pass.
// Row loops compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at run time (cpu_common.h).
#include "cpu_common.h"

namespace fastbert {
namespace cpu {
namespace {

template <typename T>
FB_INLINE void quantize_row(const T* __restrict__ x, int64_t cols, int32_t zero_point, uint8_t* __restrict__ q,
                            float* scale) {
  // max |x| on the bit patterns: with the sign cleared, a float's order is its bits' order as an unsigned
  // integer, and an integer max vectorizes where a float compare-and-select does not (GCC kept that loop
  // scalar). A NaN compares above every number, so it reaches the scale, as in torch's amax.
  uint32_t amax_bits = 0;
#pragma omp simd reduction(max : amax_bits)
  for (int64_t c = 0; c < cols; ++c) {
    const uint32_t a = float_to_bits(load_value(x, c)) & 0x7FFFFFFFu;
    amax_bits = a > amax_bits ? a : amax_bits;
  }
  const float amax = bits_to_float(amax_bits);
  const float s = amax > 0.0f ? amax / 127.0f : 1.0f;
  const float inv = 127.0f / (amax > 0.0f ? amax : 127.0f);
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    // rint rounds half to even in the default mode, as torch.round; unlike roundeven it vectorizes (vrndscaleps)
    float v = __builtin_rintf(load_value(x, c) * inv);
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    q[c] = static_cast<uint8_t>(static_cast<int32_t>(v) + zero_point);  // two's complement: zero_point 0 is int8
  }
  *scale = s;
}

template <typename T, int MODE>
FB_INLINE void dequantize_row(const float* __restrict__ acc, float scale, const float* __restrict__ bias,
                              T* __restrict__ y, int64_t cols) {
#pragma omp simd
  for (int64_t c = 0; c < cols; ++c) {
    const float v = acc[c] * scale + bias[c];
    store_value(y, c, activate<MODE>(v));  // MODE: kActivationNone (-1) or a GELU
  }
}

template <typename T>
FB_INLINE void quantize_block(const void* x, int32_t zero_point, uint8_t* q, float* scales, int64_t r0, int64_t r1,
                              int64_t cols) {
  const T* xt = static_cast<const T*>(x);
  for (int64_t r = r0; r < r1; ++r) quantize_row(xt + r * cols, cols, zero_point, q + r * cols, scales + r);
}

template <typename T, int MODE>
FB_INLINE void dequantize_block(const float* acc, const float* scales, const float* bias, void* y, int64_t r0,
                                int64_t r1, int64_t cols) {
  T* yt = static_cast<T*>(y);
  for (int64_t r = r0; r < r1; ++r) dequantize_row<T, MODE>(acc + r * cols, scales[r], bias, yt + r * cols, cols);
}

template <typename T>
FB_INLINE void dequantize_any(int mode, const float* acc, const float* scales, const float* bias, void* y, int64_t r0,
                              int64_t r1, int64_t cols) {
  if (mode == kGeluErf)
    dequantize_block<T, kGeluErf>(acc, scales, bias, y, r0, r1, cols);
  else if (mode == kGeluTanh)
    dequantize_block<T, kGeluTanh>(acc, scales, bias, y, r0, r1, cols);
  else
    dequantize_block<T, kActivationNone>(acc, scales, bias, y, r0, r1, cols);
}

#define FB_QUANTIZE_VARIANT(SUFFIX, ATTR)                                                                     \
  ATTR void quantize_##SUFFIX(int dtype, const void* x, int32_t zero_point, uint8_t* q, float* scales,        \
                              int64_t r0, int64_t r1, int64_t cols) {                                        \
    if (dtype == kFloat32)                                                                                    \
      quantize_block<float>(x, zero_point, q, scales, r0, r1, cols);                                          \
    else                                                                                                      \
      quantize_block<bf16_t>(x, zero_point, q, scales, r0, r1, cols);                                         \
  }                                                                                                           \
  ATTR void dequantize_##SUFFIX(int dtype, int mode, const float* acc, const float* scales, const float* bias, \
                                void* y, int64_t r0, int64_t r1, int64_t cols) {                              \
    if (dtype == kFloat32)                                                                                    \
      dequantize_any<float>(mode, acc, scales, bias, y, r0, r1, cols);                                        \
    else                                                                                                      \
      dequantize_any<bf16_t>(mode, acc, scales, bias, y, r0, r1, cols);                                       \
  }

FB_ISA_VARIANTS(FB_QUANTIZE_VARIANT)

}  // namespace

void quantize_rows_int8(const void* x, uint8_t* q, float* scales, int64_t rows, int64_t cols, int dtype,
                        int zero_point, int num_threads) {
  check_dtype(dtype, "quantize_rows_int8");
  check_sizes(rows, cols, "quantize_rows_int8");
  if (zero_point != 0 && zero_point != 128)
    throw std::invalid_argument("quantize_rows_int8: zero_point must be 0 (int8) or 128 (uint8), got " +
                                std::to_string(zero_point));
  const auto fn = FB_PICK_ISA(quantize);
  parallel_ranges(rows, threads_for(num_threads, rows, cols),
                  [&](int64_t r0, int64_t r1) { fn(dtype, x, zero_point, q, scales, r0, r1, cols); });
}

void dequantize_rows(const float* acc, const float* scales, const float* bias, void* y, int64_t rows, int64_t cols,
                     int dtype, int gelu_mode, int num_threads) {
  check_dtype(dtype, "dequantize_rows");
  check_sizes(rows, cols, "dequantize_rows");
  if (gelu_mode != kGeluErf && gelu_mode != kGeluTanh && gelu_mode != kActivationNone)
    throw std::invalid_argument("dequantize_rows: unknown activation code");
  const auto fn = FB_PICK_ISA(dequantize);
  parallel_ranges(rows, threads_for(num_threads, rows, cols),
                  [&](int64_t r0, int64_t r1) { fn(dtype, gelu_mode, acc, scales, bias, y, r0, r1, cols); });
}

}  // namespace cpu
}  // namespace fastbert
