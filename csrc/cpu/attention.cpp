// CPU self-attention on packed variable-length sequences (fp32, inference), one (sequence, head) per task.
//
// For each task: K is transposed once into a [head_dim x len] buffer, then query tiles of kQueryTile rows
// sweep the keys in tiles of kKeyTile columns with an online softmax (running max and sum per row, the
// output accumulator rescaled when the max grows), so no [len x len] score matrix is ever stored.
// Query rows go through both products in blocks of kRowBlock (each K^T or V vector loaded feeds
// kRowBlock FMAs; head_dim 32 and 64 keep the P.V accumulators in registers). The inner loops run over
// contiguous floats (a key tile's columns, a head's dims) and are compiled for AVX-512, AVX2+FMA and
// baseline x86-64, picked at run time like the other CPU kernels.
#include <vector>

#include "cpu_common.h"

namespace fastbert {
namespace cpu {
namespace {

constexpr int64_t kQueryTile = 16;
constexpr int64_t kKeyTile = 64;
constexpr int64_t kRowBlock = 4;

struct VarlenShape {
  int64_t heads, head_dim, row_stride;
  float scale;
};

// scores[i, 0:kKeyTile] = q[i, :] . kt[:, key0 : key0 + kKeyTile] for the tile's query rows (q already
// scaled). kt's rows are padded with zeros to a multiple of kKeyTile, so every tile is full width.
// Rows go in blocks of kRowBlock: each kt vector loaded is used by kRowBlock FMAs, and the
// kRowBlock x kKeyTile accumulators (16 AVX-512 registers) stay in registers across the head_dim loop.
template <int R>
FB_INLINE void score_rows(const float* __restrict__ q, const float* __restrict__ kt, int64_t kt_stride, int64_t key0,
                          int64_t head_dim, float* __restrict__ scores) {
  float s[R][kKeyTile];
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t j = 0; j < kKeyTile; ++j) s[r][j] = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) {
    const float* kd = kt + d * kt_stride + key0;
#pragma omp simd
    for (int64_t j = 0; j < kKeyTile; ++j) {
      const float kj = kd[j];
      for (int r = 0; r < R; ++r) s[r][j] += q[r * head_dim + d] * kj;
    }
  }
  for (int r = 0; r < R; ++r)
#pragma omp simd
    for (int64_t j = 0; j < kKeyTile; ++j) scores[r * kKeyTile + j] = s[r][j];
}

FB_INLINE void tile_scores(const float* __restrict__ q, int64_t rows, const float* __restrict__ kt, int64_t kt_stride,
                           int64_t key0, int64_t head_dim, float* __restrict__ scores) {
  int64_t i = 0;
  for (; i + kRowBlock <= rows; i += kRowBlock)
    score_rows<kRowBlock>(q + i * head_dim, kt, kt_stride, key0, head_dim, scores + i * kKeyTile);
  for (; i < rows; ++i) score_rows<1>(q + i * head_dim, kt, kt_stride, key0, head_dim, scores + i * kKeyTile);
}

// Online softmax step for one query row: s[0:n] becomes exp(s - new max) in place, the running max m
// and sum l are updated, and the factor that rescales the row's output accumulator is returned.
FB_INLINE float softmax_step(float* __restrict__ s, int64_t n, float* m, float* l) {
  float tile_max = s[0];
#pragma omp simd reduction(max : tile_max)
  for (int64_t j = 1; j < n; ++j) tile_max = s[j] > tile_max ? s[j] : tile_max;
  const float new_max = tile_max > *m ? tile_max : *m;
  const float correction = fast_exp(*m - new_max);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = fast_exp(s[j] - new_max);
    sum += s[j];
  }
  *l = *l * correction + sum;
  *m = new_max;
  return correction;
}

// acc[r] = acc[r] * correction[r] + p[r, 0:n] . v[0:n] for R rows at once (HD known at compile time):
// each V row loaded is used by R FMAs, and the R x HD accumulators stay in registers over the keys.
template <int HD, int R>
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
      for (int r = 0; r < R; ++r) a[r][d] += p[r * kKeyTile + j] * vd;
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
template <int HD>
FB_INLINE void accumulate_tile(const float* p, int64_t rows, int64_t n, const float* v, int64_t v_stride,
                               int64_t head_dim, const float* correction, float* acc, int64_t acc_stride) {
  if constexpr (HD > 0) {
    int64_t i = 0;
    for (; i + kRowBlock <= rows; i += kRowBlock)
      accumulate_rows<HD, kRowBlock>(p + i * kKeyTile, n, v, v_stride, correction + i, acc + i * acc_stride,
                                     acc_stride);
    for (; i < rows; ++i)
      accumulate_rows<HD, 1>(p + i * kKeyTile, n, v, v_stride, correction + i, acc + i * acc_stride, acc_stride);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      accumulate_row(p + i * kKeyTile, n, v, v_stride, head_dim, correction[i], acc + i * acc_stride);
  }
}

FB_INLINE int64_t padded_length(int64_t len) { return (len + kKeyTile - 1) / kKeyTile * kKeyTile; }

// One (sequence, head): rows [start, start + len) of q/k/v at column offset head * head_dim.
template <int HD>
FB_INLINE void attend_one(const float* q, const float* k, const float* v, float* out, int64_t start, int64_t len,
                          int64_t head, const VarlenShape& shape, float* kt, float* scores, float* qtile) {
  const int64_t hd = shape.head_dim, stride = shape.row_stride, col = head * hd;
  const int64_t kt_stride = padded_length(len);
  for (int64_t d = 0; d < hd; ++d)
    for (int64_t j = len; j < kt_stride; ++j) kt[d * kt_stride + j] = 0.0f;
  for (int64_t j = 0; j < len; ++j) {
    const float* kj = k + (start + j) * stride + col;
    for (int64_t d = 0; d < hd; ++d) kt[d * kt_stride + j] = kj[d];
  }
  const int64_t out_stride = shape.heads * hd;
  float m[kQueryTile], l[kQueryTile];
  for (int64_t q0 = 0; q0 < len; q0 += kQueryTile) {
    const int64_t rows = std::min<int64_t>(kQueryTile, len - q0);
    for (int64_t i = 0; i < rows; ++i) {
      const float* qi = q + (start + q0 + i) * stride + col;
      float* acc = out + (start + q0 + i) * out_stride + col;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) {
        qtile[i * hd + d] = qi[d] * shape.scale;
        acc[d] = 0.0f;
      }
      m[i] = -3.0e38f;
      l[i] = 0.0f;
    }
    for (int64_t key0 = 0; key0 < len; key0 += kKeyTile) {
      const int64_t n = std::min<int64_t>(kKeyTile, len - key0);
      tile_scores(qtile, rows, kt, kt_stride, key0, hd, scores);
      float correction[kQueryTile];
      for (int64_t i = 0; i < rows; ++i) correction[i] = softmax_step(scores + i * kKeyTile, n, &m[i], &l[i]);
      accumulate_tile<HD>(scores, rows, n, v + (start + key0) * stride + col, stride, hd, correction,
                          out + (start + q0) * out_stride + col, out_stride);
    }
    for (int64_t i = 0; i < rows; ++i) {
      float* acc = out + (start + q0 + i) * out_stride + col;
      const float inv = 1.0f / l[i];
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) acc[d] *= inv;
    }
  }
}

#define FB_ATTENTION_VARIANT(SUFFIX, ATTR)                                                                      \
  ATTR void attend_##SUFFIX(const float* q, const float* k, const float* v, float* out, int64_t start,          \
                            int64_t len, int64_t head, const VarlenShape& shape, float* kt, float* scores,      \
                            float* qtile) {                                                                    \
    if (shape.head_dim == 64)                                                                                  \
      attend_one<64>(q, k, v, out, start, len, head, shape, kt, scores, qtile);                                \
    else if (shape.head_dim == 32)                                                                             \
      attend_one<32>(q, k, v, out, start, len, head, shape, kt, scores, qtile);                                \
    else                                                                                                       \
      attend_one<0>(q, k, v, out, start, len, head, shape, kt, scores, qtile);                                 \
  }

FB_ATTENTION_VARIANT(base, )
#if FB_HAS_ISA_VARIANTS
FB_ATTENTION_VARIANT(avx2, FB_ISA_AVX2)
FB_ATTENTION_VARIANT(avx512, FB_ISA_AVX512)
#endif

using AttendFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                          const VarlenShape&, float*, float*, float*);

AttendFn pick_attend() {
#if FB_HAS_ISA_VARIANTS
  switch (isa_level()) {
    case 2: return attend_avx512;
    case 1: return attend_avx2;
  }
#endif
  return attend_base;
}

}  // namespace

void varlen_attention_fwd(const float* q, const float* k, const float* v, float* out, const int32_t* cu_seqlens,
                          int64_t batch, int64_t heads, int64_t head_dim, int64_t row_stride, int64_t max_seqlen,
                          float softmax_scale, int num_threads) {
  if (batch < 0 || heads <= 0 || head_dim <= 0 || row_stride < heads * head_dim || max_seqlen < 0)
    throw std::invalid_argument("varlen_attention_fwd: bad sizes");
  for (int64_t b = 0; b < batch; ++b)
    if (cu_seqlens[b + 1] < cu_seqlens[b] || cu_seqlens[b + 1] - cu_seqlens[b] > max_seqlen)
      throw std::invalid_argument("varlen_attention_fwd: cu_seqlens must be non-decreasing, gaps <= max_seqlen");
  const VarlenShape shape{heads, head_dim, row_stride, softmax_scale};
  const AttendFn fn = pick_attend();
  const int64_t tasks = batch * heads;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(num_threads, 1), tasks)));
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> kt(static_cast<size_t>(head_dim * padded_length(std::max<int64_t>(max_seqlen, 1))));
    std::vector<float> scores(static_cast<size_t>(kQueryTile * kKeyTile));
    std::vector<float> qtile(static_cast<size_t>(kQueryTile * head_dim));
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / heads, head = task % heads;
      const int64_t start = cu_seqlens[b], len = cu_seqlens[b + 1] - cu_seqlens[b];
      if (len > 0) fn(q, k, v, out, start, len, head, shape, kt.data(), scores.data(), qtile.data());
    }
  }
}

}  // namespace cpu
}  // namespace fastbert
