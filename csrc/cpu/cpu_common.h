// Shared helpers of the CPU kernels: bf16 <-> fp32, vectorizable exp/erfc/GELU, ISA dispatch, threads.
//
// All math here is branch-free scalar code on floats so that GCC's loop vectorizer turns the row loops
// into SIMD code. The row loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and the
// variant is picked at run time from the CPU's features (never -march=native: the wheel must run on
// any x86-64 machine).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastbert_kernels.h"

#define FB_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define FB_ISA_AVX512 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))
#define FB_ISA_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FB_HAS_ISA_VARIANTS 1
#else
#define FB_HAS_ISA_VARIANTS 0
#endif

namespace fastbert {
namespace cpu {

using bf16_t = uint16_t;

FB_INLINE float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
FB_INLINE uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// bf16 is the top half of an fp32: widening is a shift.
FB_INLINE float load_value(const float* p, int64_t i) { return p[i]; }
FB_INLINE float load_value(const bf16_t* p, int64_t i) { return bits_to_float(static_cast<uint32_t>(p[i]) << 16); }

// Round to nearest even on narrowing; NaN stays a (quiet) NaN.
FB_INLINE bf16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<bf16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}
FB_INLINE void store_value(float* p, int64_t i, float v) { p[i] = v; }
FB_INLINE void store_value(bf16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

// exp(x), |relative error| ~ 2 ulp on [-87, 88]; inputs outside are clamped (exp(-inf) ~ 1e-38).
FB_INLINE float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  float n = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - n * 0.693359375f;     // ln2 split in a high part exact in fp32 ...
  r = r - n * -2.12194440e-4f;        // ... and the low remainder (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  return p * bits_to_float(static_cast<uint32_t>(e) << 23);
}

// erfc(z) for z >= 0: Abramowitz & Stegun 7.1.26, t * poly(t) * exp(-z^2) with t = 1 / (1 + p z);
// absolute error <= 1.5e-7 (the accuracy class of PyTorch's own vectorized erf), 5 terms + one exp.
FB_INLINE float erfc_nonneg(float z) {
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  // exp(-70) keeps t * q * exp normal (a subnormal result would cost ~100 cycles per element, and GEMM
  // epilogues see |v| > 12 now and then); the true erfc there is < 1e-31, so the error is below that.
  const float e = -z * z;
  return t * q * fast_exp(e < -70.0f ? -70.0f : e);
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;

// Phi(v) = P(N(0,1) <= v) = erfc(-v / sqrt2) / 2.
// Written as arithmetic on a 0/1 sign flag rather than a branch so that the loop vectorizer keeps it.
FB_INLINE float normal_cdf(float v) {
  const float half_e = 0.5f * erfc_nonneg(std::fabs(v) * kSqrtHalf);
  const float positive = v >= 0.0f ? 1.0f : 0.0f;
  return positive + (1.0f - 2.0f * positive) * half_e;
}

// GELU and its derivative; the tanh form written as v * sigmoid(2u), u = k0 (v + k1 v^3).
template <int MODE>
FB_INLINE float gelu(float v) {
  if constexpr (MODE == kGeluErf) {
    return v * normal_cdf(v);
  } else {
    float u = kTanhK0 * (v + kTanhK1 * v * v * v);
    return v / (1.0f + fast_exp(-2.0f * u));
  }
}

template <int MODE>
FB_INLINE float gelu_grad(float v) {
  if constexpr (MODE == kGeluErf) {
    const float e = -0.5f * v * v;  // clamped as in erfc_nonneg: no subnormal products
    return normal_cdf(v) + v * kInvSqrt2Pi * fast_exp(e < -70.0f ? -70.0f : e);
  } else {
    float u = kTanhK0 * (v + kTanhK1 * v * v * v);
    float s = 1.0f / (1.0f + fast_exp(-2.0f * u));
    float du = 2.0f * kTanhK0 * (1.0f + 3.0f * kTanhK1 * v * v);
    return s + v * s * (1.0f - s) * du;
  }
}

// A GEMM epilogue's activation (an Activation code): none, GELU (erf or tanh) or tanh.
template <int MODE>
FB_INLINE float activate(float v) {
  if constexpr (MODE == kActivationGeluErf || MODE == kActivationGeluTanh) {
    return gelu<MODE>(v);
  } else if constexpr (MODE == kActivationTanh) {
    return 1.0f - 2.0f / (1.0f + fast_exp(2.0f * v));
  } else {
    return v;
  }
}

// run(std::integral_constant<int, MODE>{}) for an Activation code (a GEMM epilogue compiled per activation);
// an unknown code throws invalid_argument naming `op`.
template <typename Run>
void with_activation(int activation, const char* op, Run&& run) {
  switch (activation) {
    case kActivationNone: return run(std::integral_constant<int, kActivationNone>{});
    case kActivationGeluErf: return run(std::integral_constant<int, kActivationGeluErf>{});
    case kActivationGeluTanh: return run(std::integral_constant<int, kActivationGeluTanh>{});
    case kActivationTanh: return run(std::integral_constant<int, kActivationTanh>{});
  }
  throw std::invalid_argument(std::string(op) + ": unknown activation code " + std::to_string(activation));
}

// 2 = AVX-512 variant, 1 = AVX2+FMA, 0 = baseline. Decided once per process.
inline int isa_level() {
#if FB_HAS_ISA_VARIANTS
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return level;
#else
  return 0;
#endif
}

// A file's row kernels once per ISA: FB_ISA_VARIANTS(VARIANT) expands VARIANT(SUFFIX, ATTR) for the baseline
// (base, no attribute) and, where FB_HAS_ISA_VARIANTS, for avx2 (FB_ISA_AVX2) and avx512 (FB_ISA_AVX512).
#if FB_HAS_ISA_VARIANTS
#define FB_ISA_VARIANTS(VARIANT) VARIANT(base, ) VARIANT(avx2, FB_ISA_AVX2) VARIANT(avx512, FB_ISA_AVX512)
#else
#define FB_ISA_VARIANTS(VARIANT) VARIANT(base, )
#endif

#if FB_HAS_ISA_VARIANTS
// The variant of a row kernel that this CPU runs (isa_level); the three share one signature.
template <typename Fn>
inline Fn pick_isa(Fn avx512, Fn avx2, Fn base) {
  switch (isa_level()) {
    case 2: return avx512;
    case 1: return avx2;
  }
  return base;
}
// FB_PICK_ISA(name): name_avx512, name_avx2 or name_base (the functions a file's variant macro defines).
#define FB_PICK_ISA(NAME) ::fastbert::cpu::pick_isa(NAME##_avx512, NAME##_avx2, NAME##_base)
#else
#define FB_PICK_ISA(NAME) NAME##_base
#endif

// Threads for `rows` rows of `cols` elements: torch's count, but at least ~32k elements per thread.
inline int threads_for(int num_threads, int64_t rows, int64_t cols) {
  int64_t by_work = std::max<int64_t>(1, rows * cols / 32768);
  int64_t n = std::min<int64_t>({static_cast<int64_t>(std::max(num_threads, 1)), by_work, std::max<int64_t>(rows, 1)});
  return static_cast<int>(n);
}

// Row range [begin, end) of thread `tid` out of `n` (contiguous static blocks).
inline void row_range(int64_t rows, int tid, int n, int64_t* begin, int64_t* end) {
  int64_t base = rows / n, extra = rows % n;
  *begin = tid * base + std::min<int64_t>(tid, extra);
  *end = *begin + base + (tid < extra ? 1 : 0);
}

// fn(first, last) on up to num_threads threads (OpenMP), each over one contiguous range of [0, count).
template <typename Fn>
void parallel_ranges(int64_t count, int num_threads, Fn&& fn) {
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), std::max<int64_t>(count, 1)));
#pragma omp parallel num_threads(threads)
  {
    int64_t first, last;
    row_range(count, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
    fn(first, last);
  }
}

inline void check_dtype(int dtype, const char* op) {
  if (dtype != kFloat32 && dtype != kBFloat16)
    throw std::invalid_argument(std::string(op) + ": the CPU kernels take float32 or bfloat16 (dtype code " +
                                std::to_string(dtype) + ")");
}

inline void check_sizes(int64_t rows, int64_t cols, const char* op) {
  if (rows < 0 || cols <= 0) throw std::invalid_argument(std::string(op) + ": bad sizes");
}

}  // namespace cpu
}  // namespace fastbert
