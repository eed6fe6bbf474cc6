// CPU self-attention on packed variable-length sequences (fp32 or bf16, inference), one (sequence, head) per task.
//
// bf16 inputs are widened to fp32 once per task (K into the transposed buffer below, V into a row buffer,
// each query tile as it is scaled); scores, softmax and both products accumulate in fp32, and the output
// is rounded to bf16 (nearest even) once, from an fp32 accumulator tile.
//
// For each task: K is transposed once into a [head_dim x len] buffer, then query tiles of kQueryTile rows
// sweep the keys in tiles of kKeyTile columns (16 or 32 when every sequence fits in one) with an online
// softmax (running max and sum per row, the output accumulator rescaled when the max grows), so no
// [len x len] score matrix is ever stored. Query rows go through both products in blocks (each K^T or V
// vector loaded feeds one FMA per row of the block; head_dim 32 and 64 keep the P.V accumulators in
// registers). A problem of less than kWorkPerThread multiply-adds per thread runs on fewer threads. The inner loops run over
// contiguous floats (a key tile's columns, a head's dims) and are compiled for AVX-512, AVX2+FMA and
// baseline x86-64, picked at run time like the other CPU kernels.
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace fastbert {
namespace cpu {
namespace {

constexpr int64_t kQueryTile = 16;
constexpr int64_t kKeyTile = 64;  // keys per score tile (shorter sequences: 16 or 32, the smallest that holds them)
constexpr int64_t kRowBlock = 4;
constexpr int64_t kWorkPerThread = int64_t{1} << 17;

struct VarlenShape {
  int64_t heads, head_dim, row_stride;
  float scale;
  int64_t key_tile;  // 16, 32 or kKeyTile: the smallest that holds max_seqlen
};

// scores[i, 0:KT] = q[i, :] . kt[:, key0 : key0 + KT] for the tile's query rows (q already scaled).
// kt's rows are padded with zeros to a multiple of KT (the key tile), so every tile is full width.
// Rows go in blocks of R: each kt vector loaded is used by R FMAs, and the R x KT accumulators (16 AVX-512
// registers in tile_scores' blocks) stay in registers across the head_dim loop.
template <int R, int64_t KT>
FB_INLINE void score_rows(const float* __restrict__ q, const float* __restrict__ kt, int64_t kt_stride, int64_t key0,
                          int64_t head_dim, float* __restrict__ scores) {
  float s[R][KT];
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t j = 0; j < KT; ++j) s[r][j] = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) {
    const float* kd = kt + d * kt_stride + key0;
#pragma omp simd
    for (int64_t j = 0; j < KT; ++j) {
      const float kj = kd[j];
      for (int r = 0; r < R; ++r) s[r][j] += q[r * head_dim + d] * kj;
    }
  }
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t j = 0; j < KT; ++j) scores[r * KT + j] = s[r][j];
}

template <int64_t KT>
FB_INLINE void tile_scores(const float* __restrict__ q, int64_t rows, const float* __restrict__ kt, int64_t kt_stride,
                           int64_t key0, int64_t head_dim, float* __restrict__ scores) {
  // a short tile is one vector per row: 4 x KT / 16 accumulators would leave the FMAs waiting on each other
  constexpr int R = static_cast<int>(kRowBlock * kKeyTile / KT);
  int64_t i = 0;
  for (; i + R <= rows; i += R) score_rows<R, KT>(q + i * head_dim, kt, kt_stride, key0, head_dim, scores + i * KT);
  for (; i + kRowBlock <= rows; i += kRowBlock)
    score_rows<kRowBlock, KT>(q + i * head_dim, kt, kt_stride, key0, head_dim, scores + i * KT);
  for (; i < rows; ++i) score_rows<1, KT>(q + i * head_dim, kt, kt_stride, key0, head_dim, scores + i * KT);
}

// Online softmax step for one query row of a W-key tile (n <= W keys real): s[0:n] becomes exp(s - new max)
// in place, the running max m and sum l are updated, and the factor that rescales the row's output
// accumulator is returned. The max and the sum are pairwise trees over the whole tile, which vectorize; a
// plain loop ends in a W-step scalar chain (GCC keeps a float sum in order). Lanes j >= n count as 0.
template <int64_t W>
FB_INLINE float softmax_step(float* __restrict__ s, int64_t n, float* m, float* l) {
  float t[W];
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) t[j] = j < n ? s[j] : -3.0e38f;
  for (int64_t width = W / 2; width > 0; width /= 2)
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) t[j] = t[j] > t[j + width] ? t[j] : t[j + width];
  const float new_max = t[0] > *m ? t[0] : *m;
  const float correction = fast_exp(*m - new_max);
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) {
    s[j] = j < n ? fast_exp(s[j] - new_max) : 0.0f;
    t[j] = s[j];
  }
  for (int64_t width = W / 2; width > 0; width /= 2)
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) t[j] += t[j + width];
  *l = *l * correction + t[0];
  *m = new_max;
  return correction;
}

// acc[r] = acc[r] * correction[r] + p[r, 0:n] . v[0:n] for R rows at once (HD known at compile time):
// each V row loaded is used by R FMAs, and the R x HD accumulators stay in registers over the keys.
template <int HD, int R, int64_t KT>
FB_INLINE void accumulate_rows(const float* __restrict__ p, int64_t n, const float* __restrict__ v, int64_t v_stride,
                               const float* correction, float* acc, int64_t acc_stride) {
  float a[R][HD];
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t d = 0; d < HD; ++d) a[r][d] = acc[r * acc_stride + d] * correction[r];
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * v_stride;
#pragma omp simd
    for (int64_t d = 0; d < HD; ++d) {
      const float vd = vj[d];
      for (int r = 0; r < R; ++r) a[r][d] += p[r * KT + j] * vd;
    }
  }
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t d = 0; d < HD; ++d) acc[r * acc_stride + d] = a[r][d];
}

// The same for one row and a head_dim known only at run time (the accumulator stays in memory).
FB_INLINE void accumulate_row(const float* __restrict__ p, int64_t n, const float* __restrict__ v, int64_t v_stride,
                              int64_t head_dim, float correction, float* __restrict__ acc) {
#pragma omp simd
  for (int64_t d = 0; d < head_dim; ++d) acc[d] *= correction;
  for (int64_t j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* vj = v + j * v_stride;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) acc[d] += pj * vj[d];
  }
}

// P.V for the tile's rows: blocks of kRowBlock rows, then the remainder one by one.
template <int HD, int64_t KT>
FB_INLINE void accumulate_tile(const float* p, int64_t rows, int64_t n, const float* v, int64_t v_stride,
                               int64_t head_dim, const float* correction, float* acc, int64_t acc_stride) {
  if constexpr (HD > 0) {
    int64_t i = 0;
    for (; i + kRowBlock <= rows; i += kRowBlock)
      accumulate_rows<HD, kRowBlock, KT>(p + i * KT, n, v, v_stride, correction + i, acc + i * acc_stride,
                                         acc_stride);
    for (; i < rows; ++i)
      accumulate_rows<HD, 1, KT>(p + i * KT, n, v, v_stride, correction + i, acc + i * acc_stride, acc_stride);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      accumulate_row(p + i * KT, n, v, v_stride, head_dim, correction[i], acc + i * acc_stride);
  }
}

FB_INLINE int64_t padded_length(int64_t len, int64_t key_tile) { return (len + key_tile - 1) / key_tile * key_tile; }

// Per-thread scratch of one task: K^T (fp32, key-padded), V rows widened to fp32 (bf16 only), the scaled
// query tile, its scores, and the fp32 output accumulators (bf16 only; fp32 accumulates in `out` itself).
struct Scratch {
  float *kt, *v, *scores, *qtile, *acc;
};

// One (sequence, head): rows [start, start + len) of q/k/v at column offset head * head_dim.
template <int HD, int64_t KT, typename T>
FB_INLINE void attend_one(const T* q, const T* k, const T* v, T* out, int64_t start, int64_t len, int64_t head,
                          const VarlenShape& shape, const Scratch& w) {
  constexpr bool kWide = std::is_same_v<T, float>;
  const int64_t hd = shape.head_dim, stride = shape.row_stride, col = head * hd;
  const int64_t kt_stride = padded_length(len, KT);
  float* kt = w.kt;
  for (int64_t d = 0; d < hd; ++d)
    for (int64_t j = len; j < kt_stride; ++j) kt[d * kt_stride + j] = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    const T* kj = k + (start + j) * stride + col;
    for (int64_t d = 0; d < hd; ++d) kt[d * kt_stride + j] = load_value(kj, d);
  }
  // V as fp32 rows: the sequence's own rows for fp32, a widened copy (row stride hd) for bf16.
  const float* vrows;
  int64_t v_stride;
  if constexpr (kWide) {
    vrows = v + start * stride + col;
    v_stride = stride;
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const T* vj = v + (start + j) * stride + col;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) w.v[j * hd + d] = load_value(vj, d);
    }
    vrows = w.v;
    v_stride = hd;
  }
  const int64_t out_stride = shape.heads * hd;
  float m[kQueryTile], l[kQueryTile];
  for (int64_t q0 = 0; q0 < len; q0 += kQueryTile) {
    const int64_t rows = std::min<int64_t>(kQueryTile, len - q0);
    float* acc0;
    int64_t acc_stride;
    if constexpr (kWide) {
      acc0 = out + (start + q0) * out_stride + col;
      acc_stride = out_stride;
    } else {
      acc0 = w.acc;
      acc_stride = hd;
    }
    for (int64_t i = 0; i < rows; ++i) {
      const T* qi = q + (start + q0 + i) * stride + col;
      float* acc = acc0 + i * acc_stride;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) {
        w.qtile[i * hd + d] = load_value(qi, d) * shape.scale;
        acc[d] = 0.0f;
      }
      m[i] = -3.0e38f;
      l[i] = 0.0f;
    }
    for (int64_t key0 = 0; key0 < len; key0 += KT) {
      const int64_t n = std::min<int64_t>(KT, len - key0);
      tile_scores<KT>(w.qtile, rows, kt, kt_stride, key0, hd, w.scores);
      float correction[kQueryTile];
      for (int64_t i = 0; i < rows; ++i)
        correction[i] = softmax_step<KT>(w.scores + i * KT, n, &m[i], &l[i]);
      accumulate_tile<HD, KT>(w.scores, rows, n, vrows + key0 * v_stride, v_stride, hd, correction, acc0, acc_stride);
    }
    for (int64_t i = 0; i < rows; ++i) {
      float* acc = acc0 + i * acc_stride;
      T* dst = out + (start + q0 + i) * out_stride + col;
      const float inv = 1.0f / l[i];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) store_value(dst, d, acc[d] * inv);
    }
  }
}

template <typename T>
using AttendFn = void (*)(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, const VarlenShape&,
                          const Scratch&);

// attend_one with the head_dim known at compile time where it is 32 or 64.
template <int64_t KT, typename T>
FB_INLINE void attend_tile(const T* q, const T* k, const T* v, T* out, int64_t start, int64_t len, int64_t head,
                           const VarlenShape& shape, const Scratch& w) {
  if (shape.head_dim == 64)
    attend_one<64, KT>(q, k, v, out, start, len, head, shape, w);
  else if (shape.head_dim == 32)
    attend_one<32, KT>(q, k, v, out, start, len, head, shape, w);
  else
    attend_one<0, KT>(q, k, v, out, start, len, head, shape, w);
}

#define FB_ATTENTION_VARIANT(SUFFIX, ATTR)                                                                     \
  template <typename T>                                                                                       \
  ATTR void attend_##SUFFIX(const T* q, const T* k, const T* v, T* out, int64_t start, int64_t len,           \
                            int64_t head, const VarlenShape& shape, const Scratch& w) {                       \
    if (shape.key_tile == 16)                                                                                 \
      attend_tile<16>(q, k, v, out, start, len, head, shape, w);                                              \
    else if (shape.key_tile == 32)                                                                            \
      attend_tile<32>(q, k, v, out, start, len, head, shape, w);                                              \
    else                                                                                                      \
      attend_tile<kKeyTile>(q, k, v, out, start, len, head, shape, w);                                        \
  }

FB_ISA_VARIANTS(FB_ATTENTION_VARIANT)

template <typename T>
AttendFn<T> pick_attend() {
#if FB_HAS_ISA_VARIANTS
  return pick_isa<AttendFn<T>>(attend_avx512, attend_avx2, attend_base);
#else
  return attend_base<T>;
#endif
}

template <typename T>
void run_tasks(const T* q, const T* k, const T* v, T* out, const int32_t* cu_seqlens, int64_t batch,
               const VarlenShape& shape, int64_t max_seqlen, int num_threads) {
  const AttendFn<T> fn = pick_attend<T>();
  const int64_t heads = shape.heads, head_dim = shape.head_dim;
  const int64_t tasks = batch * heads;
  const bool wide = std::is_same_v<T, float>;
  const int64_t longest = std::max<int64_t>(max_seqlen, 1);
  // a thread per kWorkPerThread multiply-adds at most: waking a second thread costs more than a short
  // sequence's attention (one 16-token MiniLM query: ~100k)
  const int64_t by_work = std::max<int64_t>(1, tasks * longest * longest * head_dim / kWorkPerThread);
  const int nt = static_cast<int>(std::min<int64_t>({std::max(num_threads, 1), tasks, by_work}));
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> kt(static_cast<size_t>(head_dim * padded_length(longest, kKeyTile)));
    std::vector<float> vrows(wide ? 0 : static_cast<size_t>(head_dim * longest));
    std::vector<float> scores(static_cast<size_t>(kQueryTile * kKeyTile));
    std::vector<float> qtile(static_cast<size_t>(kQueryTile * head_dim));
    std::vector<float> acc(wide ? 0 : static_cast<size_t>(kQueryTile * head_dim));
    const Scratch w{kt.data(), vrows.data(), scores.data(), qtile.data(), acc.data()};
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / heads, head = task % heads;
      const int64_t start = cu_seqlens[b], len = cu_seqlens[b + 1] - cu_seqlens[b];
      if (len > 0) fn(q, k, v, out, start, len, head, shape, w);
    }
  }
}

}  // namespace

void varlen_attention_fwd(const void* q, const void* k, const void* v, void* out, const int32_t* cu_seqlens,
                          int64_t batch, int64_t heads, int64_t head_dim, int64_t row_stride, int64_t max_seqlen,
                          float softmax_scale, int dtype, int num_threads) {
  check_dtype(dtype, "varlen_attention_fwd");
  if (batch < 0 || heads <= 0 || head_dim <= 0 || row_stride < heads * head_dim || max_seqlen < 0)
    throw std::invalid_argument("varlen_attention_fwd: bad sizes");
  for (int64_t b = 0; b < batch; ++b)
    if (cu_seqlens[b + 1] < cu_seqlens[b] || cu_seqlens[b + 1] - cu_seqlens[b] > max_seqlen)
      throw std::invalid_argument("varlen_attention_fwd: cu_seqlens must be non-decreasing, gaps <= max_seqlen");
  const int64_t key_tile = max_seqlen <= 16 ? 16 : (max_seqlen <= 32 ? 32 : kKeyTile);
  const VarlenShape shape{heads, head_dim, row_stride, softmax_scale, key_tile};
  if (dtype == kFloat32)
    run_tasks(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
              static_cast<float*>(out), cu_seqlens, batch, shape, max_seqlen, num_threads);
  else
    run_tasks(static_cast<const bf16_t*>(q), static_cast<const bf16_t*>(k), static_cast<const bf16_t*>(v),
              static_cast<bf16_t*>(out), cu_seqlens, batch, shape, max_seqlen, num_threads);
}

}  // namespace cpu
}  // namespace fastbert
