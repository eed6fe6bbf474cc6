// bf16 GEMM for few rows on AMX (inference): y = act(x @ W^T + bias), x [rows, k] bf16, y [rows, n] bf16.
//
// Why: at the rows of short requests (one 16-token query up to a few hundred tokens) a GEMM reads each
// weight byte once and does little arithmetic with it, so its speed is the rate at which it streams the
// weight. oneDNN's packed bf16 GEMM (behind torch's ops) streams it at about half the rate this loop does
// on an AMX Xeon (docs/perf-notes.md, "AMX GEMM for few rows").
//
// Work split: the columns come in groups of up to 4 blocks of 16; each thread owns a contiguous range of
// groups, so its slice of the packed weight is one sequential stream. Per group, the rows of x run against
// the group's weight panel (<= 4 x 16 columns x k, which stays in L2 after its first pass): pairs of
// 16-row blocks as 2 x 2 C tiles per pair of column blocks, a remaining block as 1 x 4 C tiles, all
// 16 x 16 fp32; the epilogue adds the bias, applies the activation and rounds to bf16. A last block of
// fewer than 16 rows is copied, zero-padded, into a whole tile first.
//
// Packed weight layout: bf16_tiles.h (made by bf16_pack; the AVX512-BF16 kernel shares it).
//
// Compiled with target attributes (never -march): the wheel runs on any x86-64; amx_bf16_usable() checks
// (isa.cpp) the CPU, the OS's tile state and Linux's permission to use it (arch_prctl) before anything runs.
#include "bf16_tiles.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define FB_HAS_AMX 1
#include <immintrin.h>
#else
#define FB_HAS_AMX 0
#endif

#include <vector>

namespace fastbert {
namespace cpu {
namespace {

using namespace bf16_tiles;  // kBlockCols, kSliceK, kTileRows, kGroupBlocks (C tiles 0-3, A 4, B 5-7)

constexpr int64_t kAccStride = kGroupBlocks * kBlockCols;  // floats per accumulator row

#if FB_HAS_AMX
#define FB_ISA_AMX                                                                               \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c," \
                        "prefer-vector-width=512")))

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// One 16-row block of x against one group's panel: acc = x_block @ panel^T, acc [16, 4 * 16] fp32.
template <int BLOCKS>
FB_ISA_AMX void group_tiles(const bf16_t* x, int64_t k, const bf16_t* panel, float* acc) {
  _tile_zero(0);
  if (BLOCKS > 1) _tile_zero(1);
  if (BLOCKS > 2) _tile_zero(2);
  if (BLOCKS > 3) _tile_zero(3);
  const int64_t stride = k * static_cast<int64_t>(sizeof(bf16_t));
  for (int64_t s = 0; s < k / kSliceK; ++s) {
    const bf16_t* b = panel + s * BLOCKS * kTileElements;
    _tile_loadd(4, x + s * kSliceK, stride);
    _tile_loadd(5, b, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (BLOCKS > 1) {
      _tile_loadd(6, b + kTileElements, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (BLOCKS > 2) {
      _tile_loadd(7, b + 2 * kTileElements, 64);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (BLOCKS > 3) {
      _tile_loadd(5, b + 3 * kTileElements, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  constexpr int64_t acc_stride = kAccStride * sizeof(float);
  _tile_stored(0, acc, acc_stride);
  if (BLOCKS > 1) _tile_stored(1, acc + kBlockCols, acc_stride);
  if (BLOCKS > 2) _tile_stored(2, acc + 2 * kBlockCols, acc_stride);
  if (BLOCKS > 3) _tile_stored(3, acc + 3 * kBlockCols, acc_stride);
}

// Two 16-row blocks of x (rows 0-31) against column blocks j and j + 1 of a group's panel (`blocks` in the
// group): 2 x 2 C tiles, each A and B tile loaded once per k slice and used twice (the 1 x 4 loop above loads
// 1.25 tiles per product; from L2 that load rate, not the products, sets the pace once x has 32 rows).
// acc: [32, 4 * 16] fp32; columns 16 j .. 16 j + 31 are written.
FB_ISA_AMX void pair_tiles(const bf16_t* x, int64_t k, const bf16_t* panel, int64_t blocks, int64_t j, float* acc) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t stride = k * static_cast<int64_t>(sizeof(bf16_t));
  for (int64_t s = 0; s < k / kSliceK; ++s) {
    const bf16_t* b = panel + (s * blocks + j) * kTileElements;
    _tile_loadd(4, x + s * kSliceK, stride);
    _tile_loadd(5, x + kTileRows * k + s * kSliceK, stride);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kTileElements, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  constexpr int64_t acc_stride = kAccStride * sizeof(float);
  float* second = acc + kTileRows * kAccStride;  // row 16
  _tile_stored(0, acc + j * kBlockCols, acc_stride);
  _tile_stored(1, acc + (j + 1) * kBlockCols, acc_stride);
  _tile_stored(2, second + j * kBlockCols, acc_stride);
  _tile_stored(3, second + (j + 1) * kBlockCols, acc_stride);
}

FB_ISA_AMX void run_group(int64_t blocks, const bf16_t* x, int64_t k, const bf16_t* panel, float* acc) {
  switch (blocks) {
    case 4: group_tiles<4>(x, k, panel, acc); break;
    case 3: group_tiles<3>(x, k, panel, acc); break;
    case 2: group_tiles<2>(x, k, panel, acc); break;
    default: group_tiles<1>(x, k, panel, acc); break;
  }
}

// Groups [first, last) of the columns, every row of x; one thread.
template <int MODE>
FB_ISA_AMX void run_groups(const Problem& p, int64_t first, int64_t last) {
  const int64_t whole = p.rows / kTileRows, tail = p.rows % kTileRows;
  std::vector<bf16_t> padded(tail ? kTileRows * p.k : 0, 0);
  if (tail) std::memcpy(padded.data(), p.x + whole * kTileRows * p.k, tail * p.k * sizeof(bf16_t));
  TileConfig config;
  std::memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = kTileRows;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
  alignas(64) float acc[2 * kTileRows * kAccStride];
  for (int64_t g = first; g < last; ++g) {
    const int64_t blocks = group_blocks(g, p.n), col = g * kGroupBlocks * kBlockCols;
    const bf16_t* panel = p.packed + group_offset(g, p.k);
    const float* bias = p.bias ? p.bias + col : nullptr;
    int64_t b = 0;
    for (; blocks % 2 == 0 && b + 2 <= whole; b += 2) {  // pairs of whole row blocks, 2 x 2 tiles
      for (int64_t j = 0; j < blocks; j += 2) pair_tiles(p.x + b * kTileRows * p.k, p.k, panel, blocks, j, acc);
      store_rows<MODE>(acc, kAccStride, bias, p.y + b * kTileRows * p.n + col, p.n, 2 * kTileRows,
                       blocks * kBlockCols);
    }
    for (; b < whole + (tail ? 1 : 0); ++b) {
      run_group(blocks, b < whole ? p.x + b * kTileRows * p.k : padded.data(), p.k, panel, acc);
      store_rows<MODE>(acc, kAccStride, bias, p.y + b * kTileRows * p.n + col, p.n,
                       b < whole ? kTileRows : tail, blocks * kBlockCols);
    }
  }
  _tile_release();
}

#endif  // FB_HAS_AMX

}  // namespace

void amx_bf16_linear(const bf16_t* x, const bf16_t* packed, const float* bias, bf16_t* y, int64_t rows, int64_t n,
                     int64_t k, int activation, int num_threads) {
  run_linear(__func__, gemm::Isa::kAmxBf16, x, packed, bias, y, rows, n, k, activation, num_threads,
             [](const Problem& p, auto mode, int64_t first, int64_t last) {
#if FB_HAS_AMX
               run_groups<decltype(mode)::value>(p, first, last);
#endif
             });
}

}  // namespace cpu
}  // namespace fastbert
