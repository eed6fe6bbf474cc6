// The packed weight layout of the bf16 GEMMs for few rows (AMX: amx_bf16.cpp; AVX512-BF16: avx512_bf16.cpp),
// made once per weight by bf16_pack (bf16_pack.cpp), and their shared epilogue.
//
// Layout: the columns of W [n, k] come in groups of up to 4 blocks of 16 columns, group after group; inside
// a group, for each 32-wide slice of k, the 16 x 32 bf16 tile of each of its column blocks (1 KiB each).
// Tile row r holds k = 2r and 2r + 1 of each of the block's 16 columns, interleaved: AMX's B-tile layout,
// and also one AVX512-BF16 `vdpbf16ps` operand (16 column pairs) per tile row.
#pragma once

#include "gemm.h"

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define FB_HAS_BF16_TILES 1
#include <immintrin.h>
// prefer-vector-width=512: GCC's default 256-bit vectors made the GELU epilogue ~3x slower (perf-notes.md)
#define FB_ISA_AVX512_BF16 \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c,prefer-vector-width=512")))
#else
#define FB_HAS_BF16_TILES 0
#endif

namespace fastbert {
namespace cpu {
namespace bf16_tiles {

constexpr int64_t kBlockCols = 16;  // columns of one tile
constexpr int64_t kSliceK = 32;     // k of one tile (64 bytes of bf16 per tile row)
constexpr int64_t kTileRows = 16;   // k pairs per tile
constexpr int64_t kGroupBlocks = 4;
constexpr int64_t kTileElements = kTileRows * kSliceK;  // 512 bf16 = 1 KiB

// Column blocks in group g, and where the group's panel starts in the packed weight.
inline int64_t group_blocks(int64_t g, int64_t n) { return std::min(kGroupBlocks, n / kBlockCols - g * kGroupBlocks); }
inline int64_t group_offset(int64_t g, int64_t k) { return g * kGroupBlocks * (k / kSliceK) * kTileElements; }
inline int64_t groups(int64_t n) { return (n / kBlockCols + kGroupBlocks - 1) / kGroupBlocks; }

using Problem = gemm::Problem<bf16_t>;  // W packed by bf16_pack

// The public entry of a packed-bf16 kernel: gemm::run's checks, then each of up to num_threads threads runs
// one contiguous range of column groups, run_groups(p, mode, first, last) (mode: the activation as a
// std::integral_constant, see gemm::run).
template <typename RunGroups>
void run_linear(const char* op, gemm::Isa isa, const bf16_t* x, const bf16_t* packed, const float* bias, bf16_t* y,
                int64_t rows, int64_t n, int64_t k, int activation, int num_threads, RunGroups&& run_groups) {
  gemm::run(op, isa, kSliceK, x, packed, bias, y, rows, n, k, activation, [&](const Problem& p, auto mode) {
    parallel_ranges(groups(n), num_threads, [&](int64_t first, int64_t last) { run_groups(p, mode, first, last); });
  });
}

#if FB_HAS_BF16_TILES
// fp32 accumulators -> y rows: bias, activation, bf16 (round to nearest even). acc rows are `acc_stride`
// floats apart; `cols` is a multiple of 16.
template <int MODE>
FB_ISA_AVX512_BF16 inline void store_rows(const float* acc, int64_t acc_stride, const float* bias, bf16_t* y,
                                          int64_t n, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = acc + r * acc_stride;
    for (int64_t c = 0; c < cols; c += kBlockCols) {
      alignas(64) float v[kBlockCols];
#pragma omp simd
      for (int i = 0; i < kBlockCols; ++i) v[i] = activate<MODE>(a[c + i] + (bias ? bias[c + i] : 0.0f));
      __m256bh out = _mm512_cvtneps_pbh(_mm512_load_ps(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * n + c), reinterpret_cast<__m256i&>(out));
    }
  }
}
#endif

}  // namespace bf16_tiles
}  // namespace cpu
}  // namespace fastbert
