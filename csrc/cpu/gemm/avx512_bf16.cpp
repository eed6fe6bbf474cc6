// bf16 GEMM for few rows on AVX512-BF16 (inference), for CPUs without AMX (AMD Zen 4/5, Intel Cooper Lake):
// y = act(x @ W^T + bias), x [rows, k] bf16, y [rows, n] bf16, fp32 accumulation.
//
// Why: as on AMX (amx_bf16.cpp), a GEMM of a few rows takes the time it needs to stream its weight, and
// oneDNN's packed bf16 GEMM behind torch's ops streams it well below the memory's rate at these rows
// (docs/perf-notes.md, "bf16 GEMM for few rows without AMX").
//
// Packed weight layout: bf16_tiles.h, shared with the AMX kernel (one bf16_pack serves both). Each tile row
// is one `vdpbf16ps` operand: 16 columns x one pair of k. Work split as on AMX: each thread owns a contiguous
// range of column groups (<= 4 x 16 columns), so its share of the weight is one sequential stream. Per group,
// blocks of up to kRowBlock rows of x accumulate rows x (16 x blocks) fp32 in registers over all of k (a row
// block reads the pair x[r, 2i .. 2i + 1] as one 32-bit broadcast); the group's panel stays in L2 for the
// row blocks after the first. The epilogue (bf16_tiles::store_rows) adds the bias, applies the activation
// and rounds to bf16.
//
// Compiled with target attributes (never -march): the wheel runs on any x86-64; avx512_bf16_usable() (isa.cpp)
// checks the CPU first.
#include "bf16_tiles.h"

namespace fastbert {
namespace cpu {
namespace {

using namespace bf16_tiles;

constexpr int kRowBlock = 6;            // 6 rows x 4 blocks = 24 accumulators (+ 4 weight vectors + 1 broadcast)
constexpr int64_t kPrefetchSlices = 4;  // software prefetch this many k slices ahead in the stream

#if FB_HAS_BF16_TILES
// x rows [0, MR) against a group of NB column blocks: fp32 sums into acc [MR, 16 NB] (row stride 16 NB).
template <int MR, int NB>
FB_ISA_AVX512_BF16 void row_block(const bf16_t* x, int64_t k, const bf16_t* panel, float* acc) {
  __m512 sum[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) sum[r][j] = _mm512_setzero_ps();
  const int64_t slices = k / kSliceK, slice_elements = NB * kTileElements;
  for (int64_t s = 0; s < slices; ++s) {
    const bf16_t* tiles = panel + s * slice_elements;
    for (int64_t pair = 0; pair < kTileRows; ++pair) {
      __m512bh b[NB];
      for (int j = 0; j < NB; ++j) {
        const bf16_t* at = tiles + j * kTileElements + pair * 32;
        b[j] = (__m512bh)_mm512_loadu_si512(at);
        _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchSlices * slice_elements), _MM_HINT_T0);
      }
      const int64_t column = s * kSliceK + 2 * pair;
      for (int r = 0; r < MR; ++r) {
        int32_t both;
        std::memcpy(&both, x + r * k + column, sizeof both);
        const __m512bh a = (__m512bh)_mm512_set1_epi32(both);
        for (int j = 0; j < NB; ++j) sum[r][j] = _mm512_dpbf16_ps(sum[r][j], a, b[j]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(acc + (r * NB + j) * kBlockCols, sum[r][j]);
}

// row_block<rows, NB> for a run-time row count 1..MR.
template <int MR, int NB>
FB_ISA_AVX512_BF16 void rows_up_to(int rows, const bf16_t* x, int64_t k, const bf16_t* panel, float* acc) {
  if constexpr (MR > 0) {
    if (rows == MR)
      row_block<MR, NB>(x, k, panel, acc);
    else
      rows_up_to<MR - 1, NB>(rows, x, k, panel, acc);
  }
}

// Every row of x against one group of NB column blocks.
template <int NB, int MODE>
FB_ISA_AVX512_BF16 void run_group(const Problem& p, const bf16_t* panel, int64_t col) {
  alignas(64) float acc[kRowBlock * NB * kBlockCols];
  const float* bias = p.bias ? p.bias + col : nullptr;
  for (int64_t r0 = 0; r0 < p.rows; r0 += kRowBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, p.rows - r0));
    rows_up_to<kRowBlock, NB>(rows, p.x + r0 * p.k, p.k, panel, acc);
    store_rows<MODE>(acc, NB * kBlockCols, bias, p.y + r0 * p.n + col, p.n, rows, NB * kBlockCols);
  }
}

// Groups [first, last) of the columns; one thread.
template <int MODE>
FB_ISA_AVX512_BF16 void run_groups(const Problem& p, int64_t first, int64_t last) {
  for (int64_t g = first; g < last; ++g) {
    const bf16_t* panel = p.packed + group_offset(g, p.k);
    const int64_t col = g * kGroupBlocks * kBlockCols;
    switch (group_blocks(g, p.n)) {
      case 4: run_group<4, MODE>(p, panel, col); break;
      case 3: run_group<3, MODE>(p, panel, col); break;
      case 2: run_group<2, MODE>(p, panel, col); break;
      default: run_group<1, MODE>(p, panel, col); break;
    }
  }
}

#endif  // FB_HAS_BF16_TILES

}  // namespace

void avx512_bf16_linear(const bf16_t* x, const bf16_t* packed, const float* bias, bf16_t* y, int64_t rows, int64_t n,
                        int64_t k, int activation, int num_threads) {
  run_linear(__func__, gemm::Isa::kAvx512Bf16, x, packed, bias, y, rows, n, k, activation, num_threads,
             [](const Problem& p, auto mode, int64_t first, int64_t last) {
#if FB_HAS_BF16_TILES
               run_groups<decltype(mode)::value>(p, first, last);
#endif
             });
}

}  // namespace cpu
}  // namespace fastbert
