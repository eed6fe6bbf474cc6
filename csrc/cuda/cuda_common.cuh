// Shared device helpers of the CUDA kernels: dtype conversion, 16-byte vectors, GELU, block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/dropout_hash.h"
#include "fastbert_kernels.h"

namespace fastbert {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements moved with one load/store (16 bytes when VEC * sizeof(T) == 16).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p + i);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, VEC>& pack) {
  *reinterpret_cast<Pack<T, VEC>*>(p + i) = pack;
}

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kTanhK0 = 0.79788456080286536f;  // sqrt(2 / pi)
constexpr float kTanhK1 = 0.044715f;

// GELU(v) and GELU'(v); erfcf keeps the negative tail accurate, the tanh form is v * sigmoid(2u).
template <int MODE>
__device__ __forceinline__ float gelu(float v) {
  if (MODE == kGeluErf) return 0.5f * v * erfcf(-v * kSqrtHalf);
  const float u = kTanhK0 * (v + kTanhK1 * v * v * v);
  return v / (1.0f + __expf(-2.0f * u));
}

template <int MODE>
__device__ __forceinline__ float gelu_grad(float v) {
  if (MODE == kGeluErf) return 0.5f * erfcf(-v * kSqrtHalf) + v * kInvSqrt2Pi * expf(-0.5f * v * v);
  const float u = kTanhK0 * (v + kTanhK1 * v * v * v);
  const float s = 1.0f / (1.0f + __expf(-2.0f * u));
  return s + v * s * (1.0f - s) * 2.0f * kTanhK0 * (1.0f + 3.0f * kTanhK1 * v * v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}

// Sum of (a, b) over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 partial[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // partial[] may still be read by a previous call
  if (lane == 0) partial[warp] = make_float2(a, b);
  __syncthreads();
  float2 t = lane < warps ? partial[lane] : make_float2(0.0f, 0.0f);
  t.x = warp_sum(t.x);
  t.y = warp_sum(t.y);
  return t;
}

__device__ __forceinline__ float block_sum(float a) { return block_sum2(a, 0.0f).x; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// out_k[c] = sum over p of partial[p][k][c] for k < parts_k with out_k != nullptr (partial layout
// [parts, parts_k, cols]); one thread per column, fixed order: deterministic. Defined in bias_gelu.cu.
int launch_sum_partials(const float* partial, int parts, int parts_k, int64_t cols, float* out0, float* out1,
                        float* out2, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbert
