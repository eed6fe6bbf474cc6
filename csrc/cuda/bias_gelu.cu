// CUDA bias + GELU forward and backward.
//
// Forward: grid-stride elementwise kernel, 16-byte loads/stores when the row width and the pointers
// allow. Backward: one thread per column walking a chunk of rows (coalesced across the warp), writing
// dx and a per-chunk partial sum of dbias; sum_partials_kernel then adds the chunks.
#include <algorithm>

#include "cuda_common.cuh"

namespace fastbert {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// x, y: [rows * cols] (n_packs packs of VEC); bias: [cols] float32 or null.
template <typename T, int MODE, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_fwd_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y, int64_t n_packs,
                         int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    const int64_t first = i * VEC;
    const int64_t col = first % cols;  // VEC divides cols: the pack stays in one row
    Pack<T, VEC> in = load_pack<T, VEC>(x, first), out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float v = to_float(in.v[j]) + (bias != nullptr ? bias[col + j] : 0.0f);
      out.v[j] = from_float<T>(gelu<MODE>(v));
    }
    store_pack<T, VEC>(y, first, out);
  }
}

// dy, x, dx: [rows, cols]; partial: [gridDim.y, cols] float32 or null (no dbias wanted).
template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias,
                         T* __restrict__ dx, float* __restrict__ partial, int64_t rows, int64_t cols,
                         int64_t rows_per_chunk) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  const float b = bias != nullptr ? bias[col] : 0.0f;
  float acc = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r * cols + col;
    const float g = to_float(dy[i]) * gelu_grad<MODE>(to_float(x[i]) + b);
    dx[i] = from_float<T>(g);
    acc += g;
  }
  if (partial != nullptr) partial[static_cast<int64_t>(blockIdx.y) * cols + col] = acc;
}

template <typename T, int MODE>
int launch_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t n = rows * cols;
  const bool vec = cols % kVec == 0 && aligned16(x) && aligned16(y);
  const int64_t packs = vec ? n / kVec : n;
  const int64_t blocks = std::min<int64_t>((packs + kThreads - 1) / kThreads, 65535 * 4);
  if (vec)
    bias_gelu_fwd_kernel<T, MODE, kVec><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(x), bias, static_cast<T*>(y), packs, cols);
  else
    bias_gelu_fwd_kernel<T, MODE, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(x), bias, static_cast<T*>(y), packs, cols);
  return static_cast<int>(cudaGetLastError());
}

// Row chunks of the backward grid: about 8 blocks per SM in total, at most 1024 chunks.
void bwd_grid(int64_t rows, int64_t cols, int sm_count, int64_t* col_blocks, int64_t* chunks, int64_t* per_chunk) {
  *col_blocks = (cols + kThreads - 1) / kThreads;
  int64_t want = std::max<int64_t>(1, static_cast<int64_t>(std::max(sm_count, 1)) * 8 / *col_blocks);
  want = std::min<int64_t>({want, std::max<int64_t>(rows, 1), 1024});
  *per_chunk = (std::max<int64_t>(rows, 1) + want - 1) / want;
  *chunks = (std::max<int64_t>(rows, 1) + *per_chunk - 1) / *per_chunk;
}

template <typename T, int MODE>
int launch_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias, float* workspace,
               int64_t rows, int64_t cols, int sm_count, cudaStream_t stream) {
  int64_t col_blocks, chunks, per_chunk;
  bwd_grid(rows, cols, sm_count, &col_blocks, &chunks, &per_chunk);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks));
  bias_gelu_bwd_kernel<T, MODE><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(dy), static_cast<const T*>(x), bias, static_cast<T*>(dx),
      dbias != nullptr ? workspace : nullptr, rows, cols, per_chunk);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dbias == nullptr) return static_cast<int>(err);
  return launch_sum_partials(workspace, static_cast<int>(chunks), 1, cols, dbias, nullptr, nullptr, stream);
}

template <int MODE>
int dispatch_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, int dtype,
                 cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return launch_fwd<float, MODE>(x, bias, y, rows, cols, stream);
    case kFloat16: return launch_fwd<__half, MODE>(x, bias, y, rows, cols, stream);
    case kBFloat16: return launch_fwd<__nv_bfloat16, MODE>(x, bias, y, rows, cols, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <int MODE>
int dispatch_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias, float* workspace,
                 int64_t rows, int64_t cols, int dtype, int sm_count, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return launch_bwd<float, MODE>(dy, x, bias, dx, dbias, workspace, rows, cols, sm_count, stream);
    case kFloat16: return launch_bwd<__half, MODE>(dy, x, bias, dx, dbias, workspace, rows, cols, sm_count, stream);
    case kBFloat16:
      return launch_bwd<__nv_bfloat16, MODE>(dy, x, bias, dx, dbias, workspace, rows, cols, sm_count, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, int dtype, int gelu_mode,
                  int64_t stream) {
  if (rows < 0 || cols <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (rows == 0) return 0;
  if (gelu_mode == kGeluErf) return dispatch_fwd<kGeluErf>(x, bias, y, rows, cols, dtype, as_stream(stream));
  if (gelu_mode == kGeluTanh) return dispatch_fwd<kGeluTanh>(x, bias, y, rows, cols, dtype, as_stream(stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

int64_t bias_gelu_bwd_workspace(int64_t rows, int64_t cols, int sm_count) {
  int64_t col_blocks, chunks, per_chunk;
  bwd_grid(rows, cols, sm_count, &col_blocks, &chunks, &per_chunk);
  return chunks * cols;
}

int bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias, float* workspace,
                  int64_t rows, int64_t cols, int dtype, int gelu_mode, int sm_count, int64_t stream) {
  if (rows < 0 || cols <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = as_stream(stream);
  if (rows == 0) {
    return dbias != nullptr ? static_cast<int>(cudaMemsetAsync(dbias, 0, sizeof(float) * cols, s)) : 0;
  }
  if (gelu_mode == kGeluErf)
    return dispatch_bwd<kGeluErf>(dy, x, bias, dx, dbias, workspace, rows, cols, dtype, sm_count, s);
  if (gelu_mode == kGeluTanh)
    return dispatch_bwd<kGeluTanh>(dy, x, bias, dx, dbias, workspace, rows, cols, dtype, sm_count, s);
  return static_cast<int>(cudaErrorInvalidValue);
}

// Shared by both ops (declared in cuda_common.cuh).
__global__ void sum_partials_kernel(const float* __restrict__ partial, int parts, int parts_k, int64_t cols,
                                    float* out0, float* out1, float* out2) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int k = blockIdx.y;
  float* out = k == 0 ? out0 : (k == 1 ? out1 : out2);
  if (col >= cols || out == nullptr) return;
  float acc = 0.0f;
  for (int p = 0; p < parts; ++p) acc += partial[(static_cast<int64_t>(p) * parts_k + k) * cols + col];
  out[col] = acc;
}

int launch_sum_partials(const float* partial, int parts, int parts_k, int64_t cols, float* out0, float* out1,
                        float* out2, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + kThreads - 1) / kThreads), static_cast<unsigned>(parts_k));
  sum_partials_kernel<<<grid, kThreads, 0, stream>>>(partial, parts, parts_k, cols, out0, out1, out2);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace fastbert
