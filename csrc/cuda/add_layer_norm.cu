// CUDA add + dropout + LayerNorm forward and backward.
//
// One block per row (forward) holding the row in registers: thread t owns packs t, t + blockDim, ...
// (NV packs of VEC elements; 16-byte packs when the width and pointers allow), so any width up to
// kMaxLayerNormCols runs with at most 8 values per thread. Statistics in fp32. The backward grid has
// a fixed number of blocks that stride over rows, each keeping its columns' dweight/dbias/dx_bias
// sums in shared memory and writing one partial row to the workspace; sum_partials_kernel adds them.
#include <algorithm>

#include "cuda_common.cuh"

namespace fastbert {
namespace cuda {
namespace {

struct LnParams {
  const void* x;         // [rows, cols]
  const void* residual;  // [rows, cols] or null
  const float* weight;   // [cols]
  const float* bias;     // [cols] or null
  const float* x_bias;   // [cols] or null
  const float* mean;     // [rows] (written by forward, read by backward)
  const float* rstd;     // [rows]
  int64_t rows, cols;
  uint64_t seed;
  uint32_t threshold;    // dropout: keep where dropout_hash >= threshold (0 = no dropout)
  float scale;           // 1 / (1 - p)
};

// h = dropout(x + x_bias) + residual for thread's pack `k` of row `row`; keep[] receives the mask scale.
template <typename T, int VEC>
__device__ __forceinline__ void load_pre_norm(const LnParams& p, int64_t row, int64_t c0, float* h, float* keep) {
  const Pack<T, VEC> xv = load_pack<T, VEC>(static_cast<const T*>(p.x), row * p.cols + c0);
  Pack<T, VEC> rv;
  if (p.residual != nullptr) rv = load_pack<T, VEC>(static_cast<const T*>(p.residual), row * p.cols + c0);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float v = to_float(xv.v[j]) + (p.x_bias != nullptr ? p.x_bias[c0 + j] : 0.0f);
    keep[j] = 1.0f;
    if (p.threshold != 0u) {
      keep[j] = dropout_hash(p.seed, static_cast<uint64_t>(row * p.cols + c0 + j)) >= p.threshold ? p.scale : 0.0f;
      v *= keep[j];
    }
    if (p.residual != nullptr) v += to_float(rv.v[j]);
    h[j] = v;
  }
}

// y: [rows, cols]; mean, rstd: [rows] outputs.
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(1024) ln_fwd_kernel(LnParams p, T* __restrict__ y, float* __restrict__ mean,
                                                      float* __restrict__ rstd, float eps) {
  const int64_t row = blockIdx.x;
  float h[NV][VEC], keep[VEC];
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c0 = (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
    if (c0 < p.cols) {
      load_pre_norm<T, VEC>(p, row, c0, h[k], keep);
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += h[k][j];
    }
  }
  const float inv_n = 1.0f / static_cast<float>(p.cols);
  const float m = block_sum(sum) * inv_n;
  // variance from the registers: (h - mean)^2, no cancellation
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c0 = (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
    if (c0 < p.cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += (h[k][j] - m) * (h[k][j] - m);
    }
  }
  const float rs = rsqrtf(block_sum(ss) * inv_n + eps);
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c0 = (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
    if (c0 < p.cols) {
      Pack<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        out.v[j] = from_float<T>((h[k][j] - m) * rs * p.weight[c0 + j] + (p.bias != nullptr ? p.bias[c0 + j] : 0.0f));
      store_pack<T, VEC>(y, row * p.cols + c0, out);
    }
  }
  if (threadIdx.x == 0) {
    mean[row] = m;
    rstd[row] = rs;
  }
}

// dy, dx, dresidual (or null): [rows, cols]; partial: [gridDim.x, 3, cols] (dweight, dbias, dx_bias).
// Dynamic shared memory acc[3][cols]: this block's running column sums. Each thread only touches the
// columns it owns, so the accumulation needs no synchronization and no atomics.
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(1024) ln_bwd_kernel(LnParams p, const T* __restrict__ dy, T* __restrict__ dx,
                                                      T* __restrict__ dresidual, float* __restrict__ partial) {
  extern __shared__ float acc[];
  static_assert(NV * VEC <= 32, "the dropout mask of a thread's elements is kept in 32 bits");
  const int64_t cols = p.cols;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t c0 = (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
    if (c0 < cols) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[c0 + j] = acc[cols + c0 + j] = acc[2 * cols + c0 + j] = 0.0f;
    }
  }
  const float inv_n = 1.0f / static_cast<float>(cols);
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float m = p.mean[row], rs = p.rstd[row];
    float xhat[NV][VEC];
    uint32_t kept = 0;  // bit k * VEC + j: element survived dropout
    float sg = 0.0f, sgx = 0.0f;
    // xhat, g = dy * weight (rounded: never fused, so g - mean(g) cancels exactly), the row sums of
    // g and g * xhat, and the dweight / dbias column sums
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c0 = (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
      if (c0 < cols) {
        float keep[VEC];
        load_pre_norm<T, VEC>(p, row, c0, xhat[k], keep);
        const Pack<T, VEC> dyv = load_pack<T, VEC>(dy, row * cols + c0);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          kept |= (keep[j] != 0.0f ? 1u : 0u) << (k * VEC + j);
          const float d = to_float(dyv.v[j]);
          const float g = __fmul_rn(d, p.weight[c0 + j]);
          xhat[k][j] = (xhat[k][j] - m) * rs;
          sg += g;
          sgx += g * xhat[k][j];
          acc[c0 + j] += d * xhat[k][j];
          acc[cols + c0 + j] += d;
        }
      }
    }
    const float2 sums = block_sum2(sg, sgx);
    const float a = sums.x * inv_n, b = sums.y * inv_n;
    // dh = rstd * (g - mean(g) - xhat * mean(g * xhat)); dresidual = dh; dx = dh * mask * scale
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int64_t c0 = (static_cast<int64_t>(k) * blockDim.x + threadIdx.x) * VEC;
      if (c0 < cols) {
        const Pack<T, VEC> dyv = load_pack<T, VEC>(dy, row * cols + c0);  // second read: L1/L2 hit
        Pack<T, VEC> dxo, dro;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float g = __fmul_rn(to_float(dyv.v[j]), p.weight[c0 + j]);
          const float dh = rs * ((g - a) - xhat[k][j] * b);
          dro.v[j] = from_float<T>(dh);
          const float keep = p.threshold == 0u ? 1.0f : (((kept >> (k * VEC + j)) & 1u) ? p.scale : 0.0f);
          const float dxv = dh * keep;
          dxo.v[j] = from_float<T>(dxv);
          acc[2 * cols + c0 + j] += dxv;
        }
        store_pack<T, VEC>(dx, row * cols + c0, dxo);
        if (dresidual != nullptr) store_pack<T, VEC>(dresidual, row * cols + c0, dro);
      }
    }
  }
  __syncthreads();
  float* out = partial + static_cast<int64_t>(blockIdx.x) * 3 * cols;
  for (int64_t c = threadIdx.x; c < 3 * cols; c += blockDim.x) out[c] = acc[c];
}

// Block shape for a row: packs of VEC (16 bytes when possible), the fewest packs per thread (NV) that
// keeps the block at <= 1024 threads.
struct Shape {
  int vec, nv, threads;
};

Shape row_shape(int64_t cols, int max_vec, bool aligned) {
  const int vec = (aligned && cols % max_vec == 0) ? max_vec : 1;
  const int64_t packs = cols / vec;
  int nv = 1;
  while ((packs + nv - 1) / nv > 1024) nv *= 2;
  const int64_t per = (packs + nv - 1) / nv;
  const int threads = static_cast<int>(std::max<int64_t>(32, (per + 31) / 32 * 32));
  return Shape{vec, nv, threads};
}

int bwd_parts(int64_t rows, int sm_count) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 2 * static_cast<int64_t>(std::max(sm_count, 1)))));
}

template <typename T, int VEC, int NV>
void launch_fwd(const LnParams& p, const Shape& s, void* y, float* mean, float* rstd, float eps, cudaStream_t st) {
  ln_fwd_kernel<T, VEC, NV><<<static_cast<unsigned>(p.rows), s.threads, 0, st>>>(p, static_cast<T*>(y), mean, rstd, eps);
}

template <typename T, int VEC, int NV>
void launch_bwd(const LnParams& p, const Shape& s, const void* dy, void* dx, void* dres, float* partial, int parts,
                cudaStream_t st) {
  const size_t smem = sizeof(float) * 3 * static_cast<size_t>(p.cols);  // up to 96 KiB at width 8192
  if (smem > 48 * 1024)
    cudaFuncSetAttribute(ln_bwd_kernel<T, VEC, NV>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  ln_bwd_kernel<T, VEC, NV><<<static_cast<unsigned>(parts), s.threads, smem, st>>>(
      p, static_cast<const T*>(dy), static_cast<T*>(dx), static_cast<T*>(dres), partial);
}

// Calls LAUNCH<T, VEC, NV>(args...) for the shape; VEC is 1 or 16 / sizeof(T).
#define FB_LN_DISPATCH(LAUNCH, T, SHAPE, ...)                                   \
  do {                                                                          \
    constexpr int kWide = 16 / static_cast<int>(sizeof(T));                     \
    if ((SHAPE).vec == 1) {                                                     \
      switch ((SHAPE).nv) {                                                     \
        case 1: LAUNCH<T, 1, 1>(__VA_ARGS__); break;                            \
        case 2: LAUNCH<T, 1, 2>(__VA_ARGS__); break;                            \
        case 4: LAUNCH<T, 1, 4>(__VA_ARGS__); break;                            \
        default: LAUNCH<T, 1, 8>(__VA_ARGS__); break;                           \
      }                                                                         \
    } else if ((SHAPE).nv == 1) {                                               \
      LAUNCH<T, kWide, 1>(__VA_ARGS__);                                         \
    } else {                                                                    \
      LAUNCH<T, kWide, 2>(__VA_ARGS__);                                         \
    }                                                                           \
  } while (0)

LnParams make_params(const void* x, const void* residual, const float* weight, const float* bias,
                     const float* x_bias, const float* mean, const float* rstd, int64_t rows, int64_t cols,
                     double dropout_p, uint64_t seed) {
  return LnParams{x,    residual, weight, bias, x_bias, mean, rstd, rows, cols, seed,
                  dropout_p > 0.0 ? dropout_threshold(dropout_p) : 0u, dropout_p > 0.0 ? dropout_scale(dropout_p) : 1.0f};
}

int element_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

}  // namespace

int add_layer_norm_fwd(const void* x, const void* residual, const float* weight, const float* bias,
                       const float* x_bias, void* y, float* mean, float* rstd, int64_t rows, int64_t cols, int dtype,
                       float eps, double dropout_p, uint64_t seed, int64_t stream) {
  if (rows < 0 || cols <= 0 || cols > kMaxLayerNormCols || !(dropout_p >= 0.0 && dropout_p < 1.0) ||
      (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16))
    return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  const LnParams p = make_params(x, residual, weight, bias, x_bias, mean, rstd, rows, cols, dropout_p, seed);
  const bool aligned = aligned16(x) && aligned16(y) && (residual == nullptr || aligned16(residual));
  const Shape s = row_shape(cols, 16 / element_size(dtype), aligned);
  const cudaStream_t st = as_stream(stream);
  if (dtype == kFloat32) FB_LN_DISPATCH(launch_fwd, float, s, p, s, y, mean, rstd, eps, st);
  else if (dtype == kFloat16) FB_LN_DISPATCH(launch_fwd, __half, s, p, s, y, mean, rstd, eps, st);
  else FB_LN_DISPATCH(launch_fwd, __nv_bfloat16, s, p, s, y, mean, rstd, eps, st);
  return static_cast<int>(cudaGetLastError());
}

int64_t add_layer_norm_bwd_workspace(int64_t rows, int64_t cols, int sm_count) {
  return static_cast<int64_t>(bwd_parts(rows, sm_count)) * 3 * cols;
}

int add_layer_norm_bwd(const void* dy, const void* x, const void* residual, const float* weight,
                       const float* x_bias, const float* mean, const float* rstd, void* dx, void* dresidual,
                       float* dweight, float* dbias, float* dx_bias, float* workspace, int64_t rows, int64_t cols,
                       int dtype, double dropout_p, uint64_t seed, int sm_count, int64_t stream) {
  if (rows < 0 || cols <= 0 || cols > kMaxLayerNormCols || !(dropout_p >= 0.0 && dropout_p < 1.0) ||
      (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16))
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t st = as_stream(stream);
  if (rows == 0) {
    for (float* out : {dweight, dbias, dx_bias}) {
      if (out == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(out, 0, sizeof(float) * cols, st);
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    return 0;
  }
  const LnParams p = make_params(x, residual, weight, nullptr, x_bias, mean, rstd, rows, cols, dropout_p, seed);
  const bool aligned = aligned16(dy) && aligned16(x) && aligned16(dx) &&
                       (residual == nullptr || aligned16(residual)) && (dresidual == nullptr || aligned16(dresidual));
  const Shape s = row_shape(cols, 16 / element_size(dtype), aligned);
  const int parts = bwd_parts(rows, sm_count);
  void* dres = residual != nullptr ? dresidual : nullptr;  // null: the caller reuses dx
  if (dtype == kFloat32) FB_LN_DISPATCH(launch_bwd, float, s, p, s, dy, dx, dres, workspace, parts, st);
  else if (dtype == kFloat16) FB_LN_DISPATCH(launch_bwd, __half, s, p, s, dy, dx, dres, workspace, parts, st);
  else FB_LN_DISPATCH(launch_bwd, __nv_bfloat16, s, p, s, dy, dx, dres, workspace, parts, st);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  return launch_sum_partials(workspace, parts, 3, cols, dweight, dbias, dx_bias, st);
}

}  // namespace cuda
}  // namespace fastbert
