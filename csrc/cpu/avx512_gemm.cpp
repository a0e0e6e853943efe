// See avx512_gemm.h.
#include "avx512_gemm.h"

#include "avx512.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace torchext {
namespace cpu {

#if TORCHEXT_AVX512
namespace {



// C[t][0 .. NV·16) for t < MR: A's element (t, p) is A[t·a_row + p·a_inner].
// Masked: the columns past N are masked off (loads give 0, stores skip them).
template <int MR, int NV, bool Masked>
TX_AVX512 void tile(const float* A, int64_t a_row, int64_t a_inner, const float* B, int64_t ldb,
                    int64_t K, const __mmask16 (&mask)[2], bool accumulate, float* C, int64_t ldc) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) c[t][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K; ++p) {
    const float* b = B + p * ldb;
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      bv[v] = Masked ? _mm512_maskz_loadu_ps(mask[v], b + v * kLanes) : _mm512_loadu_ps(b + v * kLanes);
    const float* a = A + p * a_inner;
#pragma GCC unroll 8
    for (int t = 0; t < MR; ++t) {
      const __m512 av = _mm512_set1_ps(a[t * a_row]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) c[t][v] = _mm512_fmadd_ps(av, bv[v], c[t][v]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t) {
    float* row = C + t * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      float* out = row + v * kLanes;
      if (Masked) {
        if (accumulate) c[t][v] = _mm512_add_ps(c[t][v], _mm512_maskz_loadu_ps(mask[v], out));
        _mm512_mask_storeu_ps(out, mask[v], c[t][v]);
      } else {
        if (accumulate) c[t][v] = _mm512_add_ps(c[t][v], _mm512_loadu_ps(out));
        _mm512_storeu_ps(out, c[t][v]);
      }
    }
  }
}

// One panel of up to 32 columns, all rows: 8-row tiles, then 4, 2, 1.
template <int NV, bool Masked>
TX_AVX512 void panel(int64_t M, const float* A, int64_t a_row, int64_t a_inner, const float* B,
                     int64_t ldb, int64_t K, const __mmask16 (&mask)[2], bool accumulate, float* C,
                     int64_t ldc) {
  int64_t i = 0;
  for (; i + 8 <= M; i += 8)
    tile<8, NV, Masked>(A + i * a_row, a_row, a_inner, B, ldb, K, mask, accumulate, C + i * ldc, ldc);
  if (i + 4 <= M) {
    tile<4, NV, Masked>(A + i * a_row, a_row, a_inner, B, ldb, K, mask, accumulate, C + i * ldc, ldc);
    i += 4;
  }
  if (i + 2 <= M) {
    tile<2, NV, Masked>(A + i * a_row, a_row, a_inner, B, ldb, K, mask, accumulate, C + i * ldc, ldc);
    i += 2;
  }
  if (i < M) tile<1, NV, Masked>(A + i * a_row, a_row, a_inner, B, ldb, K, mask, accumulate, C + i * ldc, ldc);
}

TX_AVX512 void gemm_impl(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A,
                         int64_t lda, const float* B, int64_t ldb, bool accumulate, float* C,
                         int64_t ldc) {
  const int64_t a_row = trans_a ? 1 : lda, a_inner = trans_a ? lda : 1;
  // K in blocks of kDepth (each block's sums added into C in order), column
  // panels inside: a panel of B (kDepth × 32) stays in L1 while every row
  // tile of A streams past it.
  constexpr int64_t kDepth = 256;
  int64_t p = 0;
  do {
    const int64_t depth = std::min(kDepth, K - p);
    const bool acc = accumulate || p > 0;
    const float* Ap = A + p * a_inner;
    const float* Bp = B + p * ldb;
    for (int64_t j = 0; j < N; j += 2 * kLanes) {
      const int64_t cols = std::min<int64_t>(2 * kLanes, N - j);
      const __mmask16 mask[2] = {lanes_mask(cols), lanes_mask(cols - kLanes)};
      if (cols == 2 * kLanes) {
        panel<2, false>(M, Ap, a_row, a_inner, Bp + j, ldb, depth, mask, acc, C + j, ldc);
      } else if (cols > kLanes) {
        panel<2, true>(M, Ap, a_row, a_inner, Bp + j, ldb, depth, mask, acc, C + j, ldc);
      } else if (cols == kLanes) {
        panel<1, false>(M, Ap, a_row, a_inner, Bp + j, ldb, depth, mask, acc, C + j, ldc);
      } else {
        panel<1, true>(M, Ap, a_row, a_inner, Bp + j, ldb, depth, mask, acc, C + j, ldc);
      }
    }
    p += depth;
  } while (p < K);
}

}  // namespace

TX_AVX512 void transpose_avx512(int64_t rows, int64_t cols, const float* X, int64_t ldx, float* T,
                                int64_t ldt) {
  for (int64_t i = 0; i < rows; i += kLanes) {
    const int64_t ni = std::min(kLanes, rows - i);
    for (int64_t j = 0; j < cols; j += kLanes) {
      const int64_t nj = std::min(kLanes, cols - j);
      const __mmask16 in_cols = lanes_mask(nj), in_rows = lanes_mask(ni);
      __m512 tile[16];
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r)
        tile[r] = r < ni ? _mm512_maskz_loadu_ps(in_cols, X + (i + r) * ldx + j) : _mm512_setzero_ps();
      transpose16(tile);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c)
        if (c < nj) _mm512_mask_storeu_ps(T + (j + c) * ldt + i, in_rows, tile[c]);
    }
  }
}

void gemm_avx512(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  gemm_impl(trans_a, M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

#else  // no AVX-512 kernels in this build: avx512_kernels_supported() is false

void transpose_avx512(int64_t, int64_t, const float*, int64_t, float*, int64_t) {
  TORCH_CHECK(false, "torchext: AVX-512 kernels are not built for this CPU");
}

void gemm_avx512(bool, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                 bool, float*, int64_t) {
  TORCH_CHECK(false, "torchext: AVX-512 kernels are not built for this CPU");
}

#endif

}  // namespace cpu
}  // namespace torchext
