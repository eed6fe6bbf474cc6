// fp32 GEMM for few rows on AVX-512 (inference): y = act(x @ W^T + bias), x [rows, k], y [rows, n] fp32.
//
// Why: at the rows of short requests a GEMM is bound by how fast it streams its weight, and oneDNN's packed
// fp32 GEMM behind torch's ops reached ~17 GB/s at 16 rows on the AMX Xeon (docs/perf-notes.md, "fp32 GEMM
// for few rows"). This loop reads each weight panel once per block of up to 8 rows, with software prefetch
// a few hundred bytes ahead (the hardware prefetcher alone left the stream at about half the rate).
//
// Packed weight layout (avx512_fp32_pack): panels of 16 columns, one after another; panel j holds, for each
// k, the 16 weights W[16 j .. 16 j + 15, k] (one AVX-512 vector). A thread owns a contiguous range of
// groups of NB = 3 panels; per group, every block of MR = 8 rows of x accumulates 8 x 3 vectors in registers
// over all of k (bias as the initial value), stores them, and applies the activation on the stored tile (L1).
// The panel group stays in L2 across the row blocks; three panels are three sequential streams at once.
// (Up to 64 rows a 14 x 2 block ran until 2026-12-01: on the AMD EPYC 8 x 3 was as fast or faster at every
// row count, 1.06 vs 1.21-1.30 ms for MiniLM's GEMMs at 16 rows; docs/perf-notes.md.)
// Compiled with target attributes (never -march): the wheel runs on any x86-64; avx512_fp32_usable() (isa.cpp)
// checks the CPU first.
#include "gemm.h"

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define FB_HAS_FP32_GEMM 1
#include <immintrin.h>
#else
#define FB_HAS_FP32_GEMM 0
#endif

namespace fastbert {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;         // columns per panel: one AVX-512 vector of fp32
constexpr int64_t kPrefetchSteps = 32;  // k steps ahead (32 x 64 bytes per panel)
constexpr int kRowBlock = 8;            // MR: rows per register block
constexpr int kPanels = 3;              // NB: panels per register block (8 x 3 = 24 accumulators)

using Problem = gemm::Problem<float>;

#if FB_HAS_FP32_GEMM
#define FB_ISA_FP32_GEMM \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c,prefer-vector-width=512")))

// y[0:MR, 0:16 NB] = x[0:MR, :] @ panels^T + bias, then the activation over that tile.
template <int MR, int NB, int MODE>
FB_ISA_FP32_GEMM void row_block(const float* x, int64_t k, const float* panels, const float* bias, float* y,
                                int64_t n) {
  __m512 acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) acc[r][j] = bias ? _mm512_loadu_ps(bias + kLanes * j) : _mm512_setzero_ps();
  const int64_t panel_stride = k * kLanes;
  for (int64_t s = 0; s < k; ++s) {
    __m512 b[NB];
    for (int j = 0; j < NB; ++j) {
      const float* at = panels + j * panel_stride + s * kLanes;
      b[j] = _mm512_loadu_ps(at);
      _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchSteps * kLanes), _MM_HINT_T0);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * k + s]);
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(y + r * n + kLanes * j, acc[r][j]);
    if constexpr (MODE != kActivationNone) {
      float* row = y + r * n;
#pragma omp simd
      for (int64_t c = 0; c < NB * kLanes; ++c) row[c] = activate<MODE>(row[c]);
    }
  }
}

// row_block<rows, NB> for a run-time row count 1..MR.
template <int MR, int NB, int MODE>
FB_ISA_FP32_GEMM void rows_up_to(int rows, const float* x, int64_t k, const float* panels, const float* bias, float* y,
                                 int64_t n) {
  if constexpr (MR > 0) {
    if (rows == MR)
      row_block<MR, NB, MODE>(x, k, panels, bias, y, n);
    else
      rows_up_to<MR - 1, NB, MODE>(rows, x, k, panels, bias, y, n);
  }
}

// Groups [first, last) of NB panels, every row of x; one thread.
template <int MR, int NB, int MODE>
FB_ISA_FP32_GEMM void run_groups(const Problem& p, int64_t first, int64_t last) {
  const int64_t panels_total = p.n / kLanes;
  for (int64_t g = first; g < last; ++g) {
    const int64_t j0 = g * NB, width = std::min<int64_t>(NB, panels_total - j0), col = j0 * kLanes;
    const float* panels = p.packed + j0 * p.k * kLanes;
    const float* bias = p.bias ? p.bias + col : nullptr;
    for (int64_t r0 = 0; r0 < p.rows; r0 += MR) {
      const int rows = static_cast<int>(std::min<int64_t>(MR, p.rows - r0));
      const float* x = p.x + r0 * p.k;
      float* y = p.y + r0 * p.n + col;
      if (width == NB)
        rows_up_to<MR, NB, MODE>(rows, x, p.k, panels, bias, y, p.n);
      else if (width == 2)
        rows_up_to<MR, 2, MODE>(rows, x, p.k, panels, bias, y, p.n);
      else
        rows_up_to<MR, 1, MODE>(rows, x, p.k, panels, bias, y, p.n);
    }
  }
}

template <int MR, int NB, int MODE>
void run_parallel(const Problem& p, int num_threads) {
  const int64_t groups = (p.n / kLanes + NB - 1) / NB;
  parallel_ranges(groups, num_threads, [&](int64_t first, int64_t last) { run_groups<MR, NB, MODE>(p, first, last); });
}


#endif  // FB_HAS_FP32_GEMM

}  // namespace

void avx512_fp32_pack(const float* w, float* packed, int64_t n, int64_t k) {
  gemm::check_shape(n, k, 1, "avx512_fp32_pack");
  for (int64_t j = 0; j < n / kLanes; ++j)
    for (int64_t s = 0; s < k; ++s)
      for (int64_t c = 0; c < kLanes; ++c) packed[(j * k + s) * kLanes + c] = w[(j * kLanes + c) * k + s];
}

void avx512_fp32_linear(const float* x, const float* packed, const float* bias, float* y, int64_t rows, int64_t n,
                        int64_t k, int activation, int num_threads) {
  gemm::run(__func__, gemm::Isa::kAvx512, 1, x, packed, bias, y, rows, n, k, activation,
            [&](const Problem& p, auto mode) {
#if FB_HAS_FP32_GEMM
              run_parallel<kRowBlock, kPanels, decltype(mode)::value>(p, num_threads);
#endif
            });
}

}  // namespace cpu
}  // namespace fastbert
