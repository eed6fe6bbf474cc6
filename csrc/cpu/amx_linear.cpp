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
// Packed weight layout (amx_bf16_pack): group after group; inside a group, for each 32-wide slice of k,
// the 16 x 32 bf16 tile of each of its column blocks in AMX's B layout (tile row r holds k = 2r and 2r+1
// of each of the 16 columns, interleaved): 1 KiB per tile.
//
// Compiled with target attributes (never -march): the wheel runs on any x86-64; amx_bf16_usable() checks
// the CPU, the OS's tile state and asks Linux for permission to use it (arch_prctl) before anything runs.
#include "cpu_common.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define FB_HAS_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FB_HAS_AMX 0
#endif

#include <vector>

namespace fastbert {
namespace cpu {
namespace {

constexpr int64_t kBlockCols = 16;  // columns of one C / B tile
constexpr int64_t kSliceK = 32;     // k of one A / B tile (64 bytes of bf16 per tile row)
constexpr int64_t kTileRows = 16;
constexpr int64_t kGroupBlocks = 4;  // C tiles 0-3, A tile 4, B tiles 5-7
constexpr int64_t kTileElements = kTileRows * kSliceK;  // 512 bf16 = 1 KiB

void check_shape(int64_t n, int64_t k, const char* op) {
  if (n <= 0 || k <= 0 || n % kBlockCols != 0 || k % kSliceK != 0)
    throw std::invalid_argument(std::string(op) + ": needs out_features % 16 == 0 and in_features % 32 == 0, got " +
                                std::to_string(n) + " and " + std::to_string(k));
}

#if FB_HAS_AMX
#define FB_ISA_AMX \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,avx2,fma,f16c")))

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = (d >> 22 & 1u) && (d >> 24 & 1u);  // AMX-BF16, AMX-TILE
  const bool avx512 = (b >> 16 & 1u) && (b >> 30 & 1u) && (b >> 31 & 1u) && (b >> 17 & 1u);  // F, BW, VL, DQ
  if (!amx || !avx512 || !__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1u)) return false;  // AVX512_BF16
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  return (xcr0_lo & 0x60000u) == 0x60000u;  // the OS saves the tile config and tile data (XCR0 bits 17, 18)
}

bool linux_grants_tiles() {
  constexpr int kReqXcompPerm = 0x1023, kXfeatureTileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

// C tiles -> y rows: bias, activation, bf16 (round to nearest even).
template <int MODE>
FB_ISA_AMX void store_rows(const float* acc, const float* bias, bf16_t* y, int64_t n, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* a = acc + r * kGroupBlocks * kBlockCols;
    for (int64_t c = 0; c < cols; c += kBlockCols) {
      alignas(64) float v[kBlockCols];
#pragma omp simd
      for (int i = 0; i < kBlockCols; ++i) v[i] = activate<MODE>(a[c + i] + (bias ? bias[c + i] : 0.0f));
      __m256bh out = _mm512_cvtneps_pbh(_mm512_load_ps(v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * n + c), reinterpret_cast<__m256i&>(out));
    }
  }
}

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
  constexpr int64_t acc_stride = kGroupBlocks * kBlockCols * sizeof(float);
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
  constexpr int64_t acc_stride = kGroupBlocks * kBlockCols * sizeof(float);
  float* second = acc + kTileRows * kGroupBlocks * kBlockCols;  // row 16
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

struct Problem {
  const bf16_t* x;
  const bf16_t* packed;
  const float* bias;
  bf16_t* y;
  int64_t rows, n, k;
};

// Groups [first, last) of the columns, every row of x; one thread.
template <int MODE>
FB_ISA_AMX void run_groups(const Problem& p, int64_t first, int64_t last) {
  const int64_t whole = p.rows / kTileRows, tail = p.rows % kTileRows, blocks_total = p.n / kBlockCols;
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
  alignas(64) float acc[2 * kTileRows * kGroupBlocks * kBlockCols];
  for (int64_t g = first; g < last; ++g) {
    const int64_t blocks = std::min(kGroupBlocks, blocks_total - g * kGroupBlocks);
    const bf16_t* panel = p.packed + g * kGroupBlocks * (p.k / kSliceK) * kTileElements;
    const int64_t col = g * kGroupBlocks * kBlockCols;
    int64_t b = 0;
    for (; blocks % 2 == 0 && b + 2 <= whole; b += 2) {  // pairs of whole row blocks, 2 x 2 tiles
      for (int64_t j = 0; j < blocks; j += 2) pair_tiles(p.x + b * kTileRows * p.k, p.k, panel, blocks, j, acc);
      store_rows<MODE>(acc, p.bias ? p.bias + col : nullptr, p.y + b * kTileRows * p.n + col, p.n, 2 * kTileRows,
                       blocks * kBlockCols);
    }
    for (; b < whole + (tail ? 1 : 0); ++b) {
      run_group(blocks, b < whole ? p.x + b * kTileRows * p.k : padded.data(), p.k, panel, acc);
      store_rows<MODE>(acc, p.bias ? p.bias + col : nullptr, p.y + b * kTileRows * p.n + col, p.n,
                       b < whole ? kTileRows : tail, blocks * kBlockCols);
    }
  }
  _tile_release();
}

template <int MODE>
void run_parallel(const Problem& p, int num_threads) {
  const int64_t groups = (p.n / kBlockCols + kGroupBlocks - 1) / kGroupBlocks;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(num_threads, 1), groups));
#pragma omp parallel num_threads(threads)
  {
    int64_t first, last;
    row_range(groups, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
    run_groups<MODE>(p, first, last);
  }
}
#endif  // FB_HAS_AMX

}  // namespace

bool amx_bf16_usable() {
#if FB_HAS_AMX
  static const bool usable = cpu_has_amx_bf16() && linux_grants_tiles();
  return usable;
#else
  return false;
#endif
}

void amx_bf16_pack(const bf16_t* w, bf16_t* packed, int64_t n, int64_t k) {
  check_shape(n, k, "amx_bf16_pack");
  const int64_t blocks_total = n / kBlockCols, slices = k / kSliceK;
  for (int64_t g0 = 0; g0 < blocks_total; g0 += kGroupBlocks) {
    const int64_t blocks = std::min(kGroupBlocks, blocks_total - g0);
    bf16_t* panel = packed + g0 * slices * kTileElements;
    for (int64_t s = 0; s < slices; ++s)
      for (int64_t j = 0; j < blocks; ++j) {
        bf16_t* tile = panel + (s * blocks + j) * kTileElements;
        const bf16_t* source = w + (g0 + j) * kBlockCols * k + s * kSliceK;
        for (int64_t r = 0; r < kTileRows; ++r)
          for (int64_t c = 0; c < kBlockCols; ++c) {
            tile[r * 32 + c * 2] = source[c * k + 2 * r];
            tile[r * 32 + c * 2 + 1] = source[c * k + 2 * r + 1];
          }
      }
  }
}

void amx_bf16_linear(const bf16_t* x, const bf16_t* packed, const float* bias, bf16_t* y, int64_t rows, int64_t n,
                     int64_t k, int activation, int num_threads) {
  check_shape(n, k, "amx_bf16_linear");
  if (!amx_bf16_usable()) throw std::runtime_error("amx_bf16_linear: this CPU or OS has no usable AMX-BF16");
  if (rows <= 0) return;
#if FB_HAS_AMX
  const Problem p{x, packed, bias, y, rows, n, k};
  with_activation(activation, "amx_bf16_linear",
                  [&](auto mode) { run_parallel<decltype(mode)::value>(p, num_threads); });
#endif
}

}  // namespace cpu
}  // namespace fastbert
