// fastbert kernel library: the torch-independent C++ API of csrc/.
//
// Every function takes raw pointers to contiguous row-major arrays, sizes, a dtype code and (CUDA)
// a cudaStream_t passed as an integer. Activations (x, residual, y, dy, dx, ...) have the dtype
// `dtype`; parameter vectors (bias, weight, x_bias) and their gradients, and the saved statistics
// (mean, rstd), are always float32. A null pointer means "absent" where the comment says optional.
// Nothing here includes torch or CUDA headers: the Python side (fastbert/ops/extension/) validates
// and allocates, these functions only compute.
#pragma once

#include <cstdint>

namespace fastbert {

// dtype codes, exported by fastbert._C (FLOAT32, ...) for fastbert/ops/extension/
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// GELU approximations: exact erf ("none") and tanh ("tanh")
enum GeluMode : int { kGeluErf = 0, kGeluTanh = 1 };
// Epilogue activations of the GEMM kernels: none, GELU (the GeluMode codes) and tanh (BERT's pooler)
enum Activation : int { kActivationNone = -1, kActivationGeluErf = kGeluErf, kActivationGeluTanh = kGeluTanh,
                        kActivationTanh = 2 };

namespace cpu {

// y[r, c] = GELU(x[r, c] + bias[c]); bias optional. dtype: float32 or bfloat16.
void bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, int dtype,
                   int gelu_mode, int num_threads);

// dx = dy * GELU'(x + bias); dbias[c] = sum_r dx[r, c] (optional, float32 [cols]).
void bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias, int64_t rows,
                   int64_t cols, int dtype, int gelu_mode, int num_threads);

// h = dropout(x + x_bias) + residual; y = (h - mean) * rstd * weight + bias.
// residual, bias, x_bias optional; mean/rstd: float32 [rows] outputs (saved for backward).
void add_layer_norm_fwd(const void* x, const void* residual, const float* weight, const float* bias,
                        const float* x_bias, void* y, float* mean, float* rstd, int64_t rows, int64_t cols,
                        int dtype, float eps, double dropout_p, uint64_t seed, int num_threads);

// Gradients of add_layer_norm_fwd; the dropout mask is regenerated from `seed`.
// dresidual, dbias, dx_bias optional outputs; dweight required (float32 [cols]). Without dropout,
// dresidual equals dx: callers may pass dresidual = null and use dx for both.
void add_layer_norm_bwd(const void* dy, const void* x, const void* residual, const float* weight,
                        const float* x_bias, const float* mean, const float* rstd, void* dx, void* dresidual,
                        float* dweight, float* dbias, float* dx_bias, int64_t rows, int64_t cols, int dtype,
                        double dropout_p, uint64_t seed, int num_threads);

// Self-attention of packed variable-length sequences, float32 or bfloat16 (dtype code), inference (no
// dropout, no backward). q, k, v: token t, head h, dim d at [t * row_stride + h * head_dim + d] (a fused
// QKV output's views share row_stride = 3 * heads * head_dim); out: contiguous [tokens, heads, head_dim],
// q's dtype. Sequence b is tokens [cu_seqlens[b], cu_seqlens[b+1]); each (sequence, head) is one task;
// scores, softmax and accumulation in fp32 for both dtypes.
void varlen_attention_fwd(const void* q, const void* k, const void* v, void* out, const int32_t* cu_seqlens,
                          int64_t batch, int64_t heads, int64_t head_dim, int64_t row_stride, int64_t max_seqlen,
                          float softmax_scale, int dtype, int num_threads);

// Per-token int8 quantization (inference): scales[r] = max|x[r, :]| / 127 (1 for a zero row), q = round(x / scale)
// in [-127, 127], stored as the byte q + zero_point: 0 gives int8, 128 gives uint8 (oneDNN's u8 x s8 GEMM on
// CPUs without AMX-INT8). x: [rows, cols] fp32 or bf16 (dtype code), contiguous.
void quantize_rows_int8(const void* x, uint8_t* q, float* scales, int64_t rows, int64_t cols, int dtype,
                        int zero_point, int num_threads);

// The int8 GEMM's epilogue: y = act(acc * scales[r] + bias), acc fp32 [rows, cols], bias fp32 [cols] (required),
// y fp32 or bf16 (dtype code); gelu_mode kGeluErf, kGeluTanh or -1 (no activation).
void dequantize_rows(const float* acc, const float* scales, const float* bias, void* y, int64_t rows, int64_t cols,
                     int dtype, int gelu_mode, int num_threads);

// bf16 GEMMs for few rows (inference): y = act(x @ w^T + bias); x [rows, k], y [rows, n] bf16, contiguous;
// bias fp32 [n] optional; activation an Activation code. n % 16 == 0 and k % 32 == 0 (else invalid_argument).
// The weight is first packed once: w [n, k] bf16 -> packed (n * k bf16) by bf16_pack; both kernels take it.
// amx_bf16_usable(): the CPU has AMX-BF16 and AVX512-BF16 and Linux granted the tile state (asked once).
// avx512_bf16_usable(): the CPU has AVX-512 (F, VL, BW, DQ) and AVX512-BF16.
void bf16_pack(const uint16_t* w, uint16_t* packed, int64_t n, int64_t k);
bool amx_bf16_usable();
void amx_bf16_linear(const uint16_t* x, const uint16_t* packed, const float* bias, uint16_t* y, int64_t rows,
                     int64_t n, int64_t k, int activation, int num_threads);
bool avx512_bf16_usable();
void avx512_bf16_linear(const uint16_t* x, const uint16_t* packed, const float* bias, uint16_t* y, int64_t rows,
                        int64_t n, int64_t k, int activation, int num_threads);

// The fp32 GEMM for few rows on AVX-512, same contract with fp32 x, y and packed weight; n % 16 == 0.
// avx512_fp32_pack: w [n, k] fp32 -> packed (n * k fp32). avx512_fp32_usable(): the CPU has AVX-512.
bool avx512_fp32_usable();
void avx512_fp32_pack(const float* w, float* packed, int64_t n, int64_t k);
void avx512_fp32_linear(const float* x, const float* packed, const float* bias, float* y, int64_t rows, int64_t n,
                        int64_t k, int activation, int num_threads);

}  // namespace cpu

namespace cuda {

// Same contracts as the cpu:: functions, on device pointers, enqueued on `stream` (a cudaStream_t
// as an integer; 0 = legacy default stream). dtype: float32, float16 or bfloat16.
// Return 0 on success, else a cudaError_t code; cuda_error_string() names it.
int bias_gelu_fwd(const void* x, const float* bias, void* y, int64_t rows, int64_t cols, int dtype,
                  int gelu_mode, int64_t stream);
// The backward passes reduce dbias / dweight / dbias / dx_bias through per-block partial sums held in
// a caller-allocated float32 workspace of *_bwd_workspace(rows, cols, sm_count) elements, summed by a
// second small kernel in a fixed order (deterministic, no atomics). sm_count: the device's SM count.
int64_t bias_gelu_bwd_workspace(int64_t rows, int64_t cols, int sm_count);
int bias_gelu_bwd(const void* dy, const void* x, const float* bias, void* dx, float* dbias, float* workspace,
                  int64_t rows, int64_t cols, int dtype, int gelu_mode, int sm_count, int64_t stream);
int add_layer_norm_fwd(const void* x, const void* residual, const float* weight, const float* bias,
                       const float* x_bias, void* y, float* mean, float* rstd, int64_t rows, int64_t cols,
                       int dtype, float eps, double dropout_p, uint64_t seed, int64_t stream);
int64_t add_layer_norm_bwd_workspace(int64_t rows, int64_t cols, int sm_count);
int add_layer_norm_bwd(const void* dy, const void* x, const void* residual, const float* weight,
                       const float* x_bias, const float* mean, const float* rstd, void* dx, void* dresidual,
                       float* dweight, float* dbias, float* dx_bias, float* workspace, int64_t rows, int64_t cols,
                       int dtype, double dropout_p, uint64_t seed, int sm_count, int64_t stream);
const char* cuda_error_string(int code);
// Largest hidden size the CUDA LayerNorm kernels accept.
constexpr int64_t kMaxLayerNormCols = 8192;

}  // namespace cuda
}  // namespace fastbert
