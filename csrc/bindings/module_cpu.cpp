// fastbert._C: pybind11 bindings of the CPU kernels. Pointers arrive as Python ints (tensor.data_ptr()),
// 0 meaning "absent"; fastbert/ops/extension/ validates shapes, dtypes and devices before calling.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fastbert_kernels.h"
#include "pointers.h"

namespace py = pybind11;

#ifndef FASTBERT_WITH_CUDA_MODULE
#define FASTBERT_WITH_CUDA_MODULE 0
#endif

namespace {

using fastbert::bindings::ptr;

// The GEMMs for few rows share one signature per element type T (bf16 as uint16_t, or float), and so do their
// weight packers.
template <typename T>
using FewRowsLinear = void (*)(const T*, const T*, const float*, T*, int64_t, int64_t, int64_t, int, int);
template <typename T>
using WeightPack = void (*)(const T*, T*, int64_t, int64_t);

template <typename T>
void def_few_rows_linear(py::module_& m, const char* name, FewRowsLinear<T> linear) {
  m.def(
      name,
      [linear](uintptr_t x, uintptr_t packed, uintptr_t bias, uintptr_t y, int64_t rows, int64_t n, int64_t k,
               int activation, int threads) {
        linear(ptr<const T>(x), ptr<const T>(packed), ptr<const float>(bias), ptr<T>(y), rows, n, k, activation,
               threads);
      },
      py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("n"), py::arg("k"),
      py::arg("activation"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
}

template <typename T>
void def_weight_pack(py::module_& m, const char* name, WeightPack<T> pack) {
  m.def(
      name,
      [pack](uintptr_t w, uintptr_t packed, int64_t n, int64_t k) { pack(ptr<const T>(w), ptr<T>(packed), n, k); },
      py::arg("w"), py::arg("packed"), py::arg("n"), py::arg("k"), py::call_guard<py::gil_scoped_release>());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastbert CPU kernels (bias+GELU, add+dropout+LayerNorm); torch-independent, raw pointers";
  m.def(
      "has_cuda", [] { return FASTBERT_WITH_CUDA_MODULE != 0; },
      "Whether the CUDA kernels (module fastbert._C_cuda) were compiled by the same build.");
  m.attr("FLOAT32") = static_cast<int>(fastbert::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(fastbert::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(fastbert::kBFloat16);
  m.attr("GELU_ERF") = static_cast<int>(fastbert::kGeluErf);
  m.attr("GELU_TANH") = static_cast<int>(fastbert::kGeluTanh);
  m.attr("ACTIVATION_NONE") = static_cast<int>(fastbert::kActivationNone);
  m.attr("ACTIVATION_TANH") = static_cast<int>(fastbert::kActivationTanh);
  // The CUDA LayerNorm's widest row, exported here too: the backend registry checks it on any machine.
  m.attr("CUDA_MAX_LAYER_NORM_COLS") = fastbert::cuda::kMaxLayerNormCols;

  m.def(
      "bias_gelu_fwd",
      [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows, int64_t cols, int dtype, int mode, int threads) {
        fastbert::cpu::bias_gelu_fwd(ptr<const void>(x), ptr<const float>(bias), ptr<void>(y), rows, cols, dtype,
                                     mode, threads);
      },
      py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("gelu_mode"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "bias_gelu_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, uintptr_t dbias, int64_t rows, int64_t cols,
         int dtype, int mode, int threads) {
        fastbert::cpu::bias_gelu_bwd(ptr<const void>(dy), ptr<const void>(x), ptr<const float>(bias), ptr<void>(dx),
                                     ptr<float>(dbias), rows, cols, dtype, mode, threads);
      },
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dx"), py::arg("dbias"), py::arg("rows"),
      py::arg("cols"), py::arg("dtype"), py::arg("gelu_mode"), py::arg("num_threads"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "add_layer_norm_fwd",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t x_bias, uintptr_t y,
         uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols, int dtype, float eps, double dropout_p,
         uint64_t seed, int threads) {
        fastbert::cpu::add_layer_norm_fwd(ptr<const void>(x), ptr<const void>(residual), ptr<const float>(weight),
                                          ptr<const float>(bias), ptr<const float>(x_bias), ptr<void>(y),
                                          ptr<float>(mean), ptr<float>(rstd), rows, cols, dtype, eps, dropout_p,
                                          seed, threads);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("x_bias"), py::arg("y"),
      py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("eps"),
      py::arg("dropout_p"), py::arg("seed"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "add_layer_norm_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t x_bias, uintptr_t mean,
         uintptr_t rstd, uintptr_t dx, uintptr_t dresidual, uintptr_t dweight, uintptr_t dbias, uintptr_t dx_bias,
         int64_t rows, int64_t cols, int dtype, double dropout_p, uint64_t seed, int threads) {
        fastbert::cpu::add_layer_norm_bwd(ptr<const void>(dy), ptr<const void>(x), ptr<const void>(residual),
                                          ptr<const float>(weight), ptr<const float>(x_bias),
                                          ptr<const float>(mean), ptr<const float>(rstd), ptr<void>(dx),
                                          ptr<void>(dresidual), ptr<float>(dweight), ptr<float>(dbias),
                                          ptr<float>(dx_bias), rows, cols, dtype, dropout_p, seed, threads);
      },
      py::arg("dy"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("x_bias"), py::arg("mean"),
      py::arg("rstd"), py::arg("dx"), py::arg("dresidual"), py::arg("dweight"), py::arg("dbias"),
      py::arg("dx_bias"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("dropout_p"),
      py::arg("seed"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "varlen_attention_fwd",
      [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t cu_seqlens, int64_t batch, int64_t heads,
         int64_t head_dim, int64_t row_stride, int64_t max_seqlen, float scale, int dtype, int threads) {
        fastbert::cpu::varlen_attention_fwd(ptr<const void>(q), ptr<const void>(k), ptr<const void>(v),
                                            ptr<void>(out), ptr<const int32_t>(cu_seqlens), batch, heads, head_dim,
                                            row_stride, max_seqlen, scale, dtype, threads);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("cu_seqlens"), py::arg("batch"),
      py::arg("heads"), py::arg("head_dim"), py::arg("row_stride"), py::arg("max_seqlen"), py::arg("softmax_scale"),
      py::arg("dtype"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "quantize_rows_int8",
      [](uintptr_t x, uintptr_t q, uintptr_t scales, int64_t rows, int64_t cols, int dtype, int zero_point,
         int threads) {
        fastbert::cpu::quantize_rows_int8(ptr<const void>(x), ptr<uint8_t>(q), ptr<float>(scales), rows, cols, dtype,
                                          zero_point, threads);
      },
      py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("zero_point"),
      py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_rows",
      [](uintptr_t acc, uintptr_t scales, uintptr_t bias, uintptr_t y, int64_t rows, int64_t cols, int dtype,
         int gelu_mode, int threads) {
        fastbert::cpu::dequantize_rows(ptr<const float>(acc), ptr<const float>(scales), ptr<const float>(bias),
                                       ptr<void>(y), rows, cols, dtype, gelu_mode, threads);
      },
      py::arg("acc"), py::arg("scales"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("cols"),
      py::arg("dtype"), py::arg("gelu_mode"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>());
  def_weight_pack<uint16_t>(m, "bf16_pack", &fastbert::cpu::bf16_pack);
  m.def("amx_bf16_usable", &fastbert::cpu::amx_bf16_usable,
        "Whether this CPU and OS run the AMX bf16 GEMM (asks Linux for the tile state on the first call).");
  def_few_rows_linear<uint16_t>(m, "amx_bf16_linear", &fastbert::cpu::amx_bf16_linear);
  m.def("avx512_bf16_usable", &fastbert::cpu::avx512_bf16_usable, "Whether this CPU runs the AVX512-BF16 bf16 GEMM.");
  def_few_rows_linear<uint16_t>(m, "avx512_bf16_linear", &fastbert::cpu::avx512_bf16_linear);
  m.def("avx512_fp32_usable", &fastbert::cpu::avx512_fp32_usable, "Whether this CPU runs the AVX-512 fp32 GEMM.");
  def_weight_pack<float>(m, "avx512_fp32_pack", &fastbert::cpu::avx512_fp32_pack);
  def_few_rows_linear<float>(m, "avx512_fp32_linear", &fastbert::cpu::avx512_fp32_linear);
}
