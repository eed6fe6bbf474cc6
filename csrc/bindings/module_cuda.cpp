// fastbert._C_cuda: pybind11 bindings of the CUDA kernels. Compiled by the host C++ compiler without
// CUDA headers; the kernels' launchers (csrc/cuda/*.cu, built by nvcc) take the stream as an integer.
// A separate module from fastbert._C so that machines without a GPU never load CUDA code.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastbert_kernels.h"
#include "pointers.h"

namespace py = pybind11;

namespace {

using fastbert::bindings::ptr;

void check(int code, const char* op) {
  if (code != 0)
    throw std::runtime_error(std::string("fastbert._C_cuda.") + op + ": " + fastbert::cuda::cuda_error_string(code));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastbert CUDA kernels (bias+GELU, add+dropout+LayerNorm); torch-independent, raw pointers";
  m.attr("MAX_LAYER_NORM_COLS") = fastbert::cuda::kMaxLayerNormCols;
  m.def("bias_gelu_bwd_workspace", &fastbert::cuda::bias_gelu_bwd_workspace, py::arg("rows"), py::arg("cols"),
        py::arg("sm_count"), "float32 elements of workspace bias_gelu_bwd needs");
  m.def("add_layer_norm_bwd_workspace", &fastbert::cuda::add_layer_norm_bwd_workspace, py::arg("rows"),
        py::arg("cols"), py::arg("sm_count"), "float32 elements of workspace add_layer_norm_bwd needs");
  m.def(
      "bias_gelu_fwd",
      [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows, int64_t cols, int dtype, int mode, int64_t stream) {
        check(fastbert::cuda::bias_gelu_fwd(ptr<const void>(x), ptr<const float>(bias), ptr<void>(y), rows, cols,
                                            dtype, mode, stream),
              "bias_gelu_fwd");
      },
      py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("gelu_mode"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "bias_gelu_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t bias, uintptr_t dx, uintptr_t dbias, uintptr_t workspace, int64_t rows,
         int64_t cols, int dtype, int mode, int sm_count, int64_t stream) {
        check(fastbert::cuda::bias_gelu_bwd(ptr<const void>(dy), ptr<const void>(x), ptr<const float>(bias),
                                            ptr<void>(dx), ptr<float>(dbias), ptr<float>(workspace), rows, cols,
                                            dtype, mode, sm_count, stream),
              "bias_gelu_bwd");
      },
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dx"), py::arg("dbias"), py::arg("workspace"),
      py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("gelu_mode"), py::arg("sm_count"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "add_layer_norm_fwd",
      [](uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias, uintptr_t x_bias, uintptr_t y,
         uintptr_t mean, uintptr_t rstd, int64_t rows, int64_t cols, int dtype, float eps, double dropout_p,
         uint64_t seed, int64_t stream) {
        check(fastbert::cuda::add_layer_norm_fwd(ptr<const void>(x), ptr<const void>(residual),
                                                 ptr<const float>(weight), ptr<const float>(bias),
                                                 ptr<const float>(x_bias), ptr<void>(y), ptr<float>(mean),
                                                 ptr<float>(rstd), rows, cols, dtype, eps, dropout_p, seed, stream),
              "add_layer_norm_fwd");
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("x_bias"), py::arg("y"),
      py::arg("mean"), py::arg("rstd"), py::arg("rows"), py::arg("cols"), py::arg("dtype"), py::arg("eps"),
      py::arg("dropout_p"), py::arg("seed"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "add_layer_norm_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t x_bias, uintptr_t mean,
         uintptr_t rstd, uintptr_t dx, uintptr_t dresidual, uintptr_t dweight, uintptr_t dbias, uintptr_t dx_bias,
         uintptr_t workspace, int64_t rows, int64_t cols, int dtype, double dropout_p, uint64_t seed, int sm_count,
         int64_t stream) {
        check(fastbert::cuda::add_layer_norm_bwd(ptr<const void>(dy), ptr<const void>(x), ptr<const void>(residual),
                                                 ptr<const float>(weight), ptr<const float>(x_bias),
                                                 ptr<const float>(mean), ptr<const float>(rstd), ptr<void>(dx),
                                                 ptr<void>(dresidual), ptr<float>(dweight), ptr<float>(dbias),
                                                 ptr<float>(dx_bias), ptr<float>(workspace), rows, cols, dtype,
                                                 dropout_p, seed, sm_count, stream),
              "add_layer_norm_bwd");
      },
      py::arg("dy"), py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("x_bias"), py::arg("mean"),
      py::arg("rstd"), py::arg("dx"), py::arg("dresidual"), py::arg("dweight"), py::arg("dbias"),
      py::arg("dx_bias"), py::arg("workspace"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("dropout_p"), py::arg("seed"), py::arg("sm_count"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
