// The CPU GEMMs for few rows (inference): y [rows, n] = act(x [rows, k] @ W^T + bias), W packed once per weight.
// What the three kernels (amx_bf16.cpp, avx512_bf16.cpp, avx512_fp32.cpp) share: one call's Problem, one shape
// check, one probe of what the CPU (and OS) can run (isa.cpp), and the entry every public function goes through.
#pragma once

#include "../cpu_common.h"

namespace fastbert {
namespace cpu {
namespace gemm {

template <typename T>
struct Problem {
  const T* x;
  const T* packed;
  const float* bias;  // fp32 [n] or nullptr
  T* y;
  int64_t rows, n, k;
};

// What a kernel needs, probed once per process (isa.cpp). AMX also needs Linux to grant the tile state.
enum class Isa { kAvx512, kAvx512Bf16, kAmxBf16 };
bool has(Isa isa);
const char* name(Isa isa);

// Every kernel stores whole 16-column vectors (n % 16 == 0); bf16 reads k in 32-wide slices (k_multiple).
inline void check_shape(int64_t n, int64_t k, int64_t k_multiple, const char* op) {
  if (n > 0 && k > 0 && n % 16 == 0 && k % k_multiple == 0) return;
  const std::string k_rule = k_multiple > 1 ? "in_features % " + std::to_string(k_multiple) + " == 0" : "in_features > 0";
  throw std::invalid_argument(std::string(op) + ": needs out_features % 16 == 0 and " + k_rule + ", got " +
                              std::to_string(n) + " and " + std::to_string(k));
}

// The public entry of a kernel: the shape and CPU checks, then kernel(problem, mode) with the activation as a
// compile-time mode (std::integral_constant), so each epilogue is compiled once per activation.
template <typename T, typename Kernel>
void run(const char* op, Isa isa, int64_t k_multiple, const T* x, const T* packed, const float* bias, T* y,
         int64_t rows, int64_t n, int64_t k, int activation, Kernel&& kernel) {
  check_shape(n, k, k_multiple, op);
  if (!has(isa)) throw std::runtime_error(std::string(op) + ": this CPU (or OS) cannot run " + name(isa));
  if (rows <= 0) return;
  const Problem<T> p{x, packed, bias, y, rows, n, k};
  with_activation(activation, op, [&](auto mode) { kernel(p, mode); });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace fastbert
