// bf16_pack: W [n, k] bf16 -> the tiled layout of the bf16 GEMMs for few rows (bf16_tiles.h describes it).
#include "bf16_tiles.h"

namespace fastbert {
namespace cpu {

void bf16_pack(const bf16_t* w, bf16_t* packed, int64_t n, int64_t k) {
  using namespace bf16_tiles;
  gemm::check_shape(n, k, kSliceK, "bf16_pack");
  const int64_t slices = k / kSliceK;
  for (int64_t g = 0; g < groups(n); ++g) {
    const int64_t blocks = group_blocks(g, n);
    bf16_t* panel = packed + group_offset(g, k);
    for (int64_t s = 0; s < slices; ++s)
      for (int64_t j = 0; j < blocks; ++j) {
        bf16_t* tile = panel + (s * blocks + j) * kTileElements;
        const bf16_t* source = w + (g * kGroupBlocks + j) * kBlockCols * k + s * kSliceK;
        for (int64_t r = 0; r < kTileRows; ++r)
          for (int64_t c = 0; c < kBlockCols; ++c) {
            tile[r * 32 + c * 2] = source[c * k + 2 * r];
            tile[r * 32 + c * 2 + 1] = source[c * k + 2 * r + 1];
          }
      }
  }
}

}  // namespace cpu
}  // namespace fastbert
