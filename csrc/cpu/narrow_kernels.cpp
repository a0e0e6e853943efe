// AVX-512 kernels of the quadratic plan for narrow layers; see narrow_kernels.h.
//
// Layout: a block of kBlock samples is held feature-major (row c of zT is
// feature c of every sample in the block), so one __m512 holds one feature of
// sixteen samples. The products with the weights are register-blocked as
// 8 output units × 32 samples (16 accumulators; each weight is one broadcast
// shared by two vectors), the sample-summed outer products (dW, Gram) as
// 4 × 4 units, accumulated lane-wise per partition and summed across lanes
// once per partition, in a fixed order.
#include "narrow_kernels.h"

#include "avx512.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace torchext {
namespace cpu {
namespace {


constexpr int64_t S = NarrowWorkspace::kBlock;

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Vectors (of 16 samples) a block of ns samples spans, rounded up to pairs
// (only the AVX-512 kernels ask).
[[maybe_unused]] int64_t vectors_for(int64_t ns) { return round_up(ns, 2 * kLanes) / kLanes; }

}  // namespace

NarrowWeights::NarrowWeights(int64_t d_, int64_t k_, const float* W_, const float* Q_)
    : d(d_), k(k_), Kp(round_up(std::max<int64_t>(k_, 1), 8)), Dp(round_up(std::max<int64_t>(d_, 1), 8)),
      W(Kp * d, 0.f), WT(Dp * Kp, 0.f), Q(Kp * Kp, 0.f), Qupper(Kp * Kp, 0.f) {
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < d; ++j) {
      W[i * d + j] = W_[i * d + j];
      WT[j * Kp + i] = W_[i * d + j];
    }
  if (Q_ != nullptr)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        Q[i * Kp + j] = Q_[i * k + j];
        // rᵀ Q r = Σ_i r_i (Q_ii r_i + Σ_{j>i} (Q_ij + Q_ji) r_j)
        Qupper[i * Kp + j] = j == i ? Q_[i * k + i] : j > i ? Q_[i * k + j] + Q_[j * k + i] : 0.f;
      }
}

NarrowWorkspace::NarrowWorkspace(const NarrowWeights& w, bool accumulate) {
  FloatSpan* spans[] = {&zT, &rT, &qT, &pT, &grT, &g, &dW, &gram};
  const int64_t sizes[] = {w.Dp * S, w.Kp * S, w.Kp * S, w.Kp * S, w.Kp * S, S,
                           accumulate ? w.Kp * w.Dp * kLanes : 0,
                           accumulate ? w.Kp * w.Kp * kLanes : 0};
  int64_t total = 0;
  for (int64_t n : sizes) total += padded_elems(n);
  float* next = aligned_block<float>(arena_, total);
  std::fill(next, next + total, 0.f);
  for (int i = 0; i < 8; ++i) {
    *spans[i] = {next, sizes[i]};
    next += padded_elems(sizes[i]);
  }
}

void NarrowWorkspace::flush(const NarrowWeights& w, float* gW, float* G) {
  auto lane_sum = [](const float* v) {
    float s = 0.f;
    for (int64_t l = 0; l < kLanes; ++l) s += v[l];
    return s;
  };
  if (gW != nullptr)
    for (int64_t i = 0; i < w.k; ++i)
      for (int64_t j = 0; j < w.d; ++j) gW[i * w.d + j] = lane_sum(&dW[(i * w.Dp + j) * kLanes]);
  if (G != nullptr)
    for (int64_t i = 0; i < w.k; ++i)
      for (int64_t j = i; j < w.k; ++j) G[i * w.k + j] = lane_sum(&gram[(i * w.Kp + j) * kLanes]);
  std::fill(dW.begin(), dW.end(), 0.f);
  std::fill(gram.begin(), gram.end(), 0.f);
}

#if TORCHEXT_AVX512
namespace {

TX_AVX512 inline __m512i row_offsets(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(int(stride)));
}

// T[c][s] = X[s][c] for c < cols and s < ns (X rows of `stride` floats);
// zero for the padding samples up to nv vectors. Whole 16 × 16 tiles are
// transposed in registers; ragged edges are gathered.
TX_AVX512 void load_transposed(const float* X, int64_t stride, int64_t cols, int64_t ns,
                               int64_t nv, float* T) {
  const __m512i idx = row_offsets(stride);
  for (int64_t v = 0; v < nv; ++v) {
    const __mmask16 m = lanes_mask(ns - v * kLanes);
    if (m == 0) {
      for (int64_t c = 0; c < cols; ++c) _mm512_storeu_ps(T + c * S + v * kLanes, _mm512_setzero_ps());
      continue;
    }
    const float* base = X + v * kLanes * stride;
    int64_t c0 = 0;
    if (m == __mmask16(0xFFFF)) {
      for (; c0 + kLanes <= cols; c0 += kLanes) {
        __m512 tile[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) tile[i] = _mm512_loadu_ps(base + i * stride + c0);
        transpose16(tile);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(T + (c0 + i) * S + v * kLanes, tile[i]);
      }
    }
    for (int64_t c = c0; c < cols; ++c)
      _mm512_storeu_ps(T + c * S + v * kLanes,
                       _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, base + c, 4));
  }
}

// X[s][c] = T[c][s] for c < cols and s < ns.
TX_AVX512 void store_transposed(const float* T, int64_t cols, int64_t ns, float* X,
                                int64_t stride) {
  const __m512i idx = row_offsets(stride);
  for (int64_t v = 0; v * kLanes < ns; ++v) {
    const __mmask16 m = lanes_mask(ns - v * kLanes);
    float* base = X + v * kLanes * stride;
    int64_t c0 = 0;
    if (m == __mmask16(0xFFFF)) {
      for (; c0 + kLanes <= cols; c0 += kLanes) {
        __m512 tile[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) tile[i] = _mm512_loadu_ps(T + (c0 + i) * S + v * kLanes);
        transpose16(tile);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(base + i * stride + c0, tile[i]);
      }
    }
    for (int64_t c = c0; c < cols; ++c)
      _mm512_mask_i32scatter_ps(base + c, m, idx, _mm512_loadu_ps(T + c * S + v * kLanes), 4);
  }
}

// One vector of samples of p = 2 g q where not r <= 0 (else 0), and of g r:
// threshold_backward's select, so a NaN unit passes its gradient and a NaN g
// stays out of inactive units.
TX_AVX512 inline void store_relu_grad(__m512 g, __m512 r, __m512 q, float* p, float* gr) {
  const __mmask16 active = _mm512_cmp_ps_mask(r, _mm512_setzero_ps(), _CMP_NLE_UQ);
  _mm512_storeu_ps(p, _mm512_maskz_mul_ps(active, _mm512_add_ps(g, g), q));
  _mm512_storeu_ps(gr, _mm512_mul_ps(g, r));
}

// What a product does with its 8 × 32 block of results acc[i][s] = Σ_j A[i][j] inT[j][s].
enum class Epilogue {
  kStore,      // outT = acc
  kRelu,       // outT = max(0, acc), keeping NaN
  kQuadForm,   // f[s] += Σ_i inT[i][s] acc[i][s] (A upper-triangular: j starts at the block's row)
  kReluGrad,   // store_relu_grad with q = acc, r = inT: pT and grT
};

// The products of the per-sample chain over a block of nv vectors (pairs of
// 16-sample vectors): i < rows (a multiple of 8), j < inner; A row-major with
// leading dimension lda. Rows from `live` on are padding: their results are
// stored as zeros (kQuadForm skips them), never as A's zero row times the
// input, which is NaN where an input is infinite (0 · inf) and would reach
// every real result through the next product.
template <Epilogue E>
TX_AVX512 void product(const float* A, int64_t lda, int64_t rows, int64_t live, int64_t inner,
                       const float* inT, int64_t nv, float* outT, const float* g = nullptr,
                       float* grT = nullptr) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t v = 0; v < nv; v += 2) {
    const int64_t s = v * kLanes;
    __m512 f0 = zero, f1 = zero, g0 = zero, g1 = zero;
    if constexpr (E == Epilogue::kReluGrad) {
      g0 = _mm512_loadu_ps(g + s);
      g1 = _mm512_loadu_ps(g + s + kLanes);
    }
    for (int64_t i0 = 0; i0 < rows; i0 += 8) {
      __m512 a0[8], a1[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) a0[t] = a1[t] = zero;
      const float* arow = A + i0 * lda;
      for (int64_t j = E == Epilogue::kQuadForm ? i0 : 0; j < inner; ++j) {
        const __m512 x0 = _mm512_loadu_ps(inT + j * S + s);
        const __m512 x1 = _mm512_loadu_ps(inT + j * S + s + kLanes);
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          const __m512 b = _mm512_set1_ps(arow[t * lda + j]);
          a0[t] = _mm512_fmadd_ps(b, x0, a0[t]);
          a1[t] = _mm512_fmadd_ps(b, x1, a1[t]);
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const int64_t o = (i0 + t) * S + s;
        if (i0 + t >= live) {
          if constexpr (E != Epilogue::kQuadForm) {
            _mm512_storeu_ps(outT + o, zero);
            _mm512_storeu_ps(outT + o + kLanes, zero);
          }
          if constexpr (E == Epilogue::kReluGrad) {
            _mm512_storeu_ps(grT + o, zero);
            _mm512_storeu_ps(grT + o + kLanes, zero);
          }
        } else if constexpr (E == Epilogue::kStore) {
          _mm512_storeu_ps(outT + o, a0[t]);
          _mm512_storeu_ps(outT + o + kLanes, a1[t]);
        } else if constexpr (E == Epilogue::kRelu) {
          // max(0, x) returns its second operand when one is NaN: NaN stays NaN.
          _mm512_storeu_ps(outT + o, _mm512_max_ps(zero, a0[t]));
          _mm512_storeu_ps(outT + o + kLanes, _mm512_max_ps(zero, a1[t]));
        } else if constexpr (E == Epilogue::kQuadForm) {
          f0 = _mm512_fmadd_ps(_mm512_loadu_ps(inT + o), a0[t], f0);
          f1 = _mm512_fmadd_ps(_mm512_loadu_ps(inT + o + kLanes), a1[t], f1);
        } else {
          store_relu_grad(g0, _mm512_loadu_ps(inT + o), a0[t], outT + o, grT + o);
          store_relu_grad(g1, _mm512_loadu_ps(inT + o + kLanes), a1[t], outT + o + kLanes,
                          grT + o + kLanes);
        }
      }
    }
    if constexpr (E == Epilogue::kQuadForm) {
      _mm512_storeu_ps(outT + s, f0);
      _mm512_storeu_ps(outT + s + kLanes, f1);
    }
  }
}

// f[s] = Σ_i rT[i][s] qT[i][s] (in unit order).
TX_AVX512 void row_dots(const float* rT, const float* qT, int64_t rows, int64_t nv, float* f) {
  for (int64_t v = 0; v < nv; ++v) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < rows; ++i)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(rT + i * S + v * kLanes),
                            _mm512_loadu_ps(qT + i * S + v * kLanes), acc);
    _mm512_storeu_ps(f + v * kLanes, acc);
  }
}

// pT, grT from saved rT and qT (see store_relu_grad).
TX_AVX512 void relu_grad(const float* g, const float* rT, const float* qT, int64_t rows,
                         int64_t nv, float* pT, float* grT) {
  for (int64_t v = 0; v < nv; ++v) {
    const __m512 gv = _mm512_loadu_ps(g + v * kLanes);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t o = i * S + v * kLanes;
      store_relu_grad(gv, _mm512_loadu_ps(rT + o), _mm512_loadu_ps(qT + o), pT + o, grT + o);
    }
  }
}

// acc[i][j] += XT[i] ⊙ YT[j] lane-wise, summed over the block's vectors, for
// 4 × 4 tiles of units (rows multiples of 4); upper: only tiles with j0 >= i0.
TX_AVX512 void accumulate_outer(const float* XT, int64_t rows_x, const float* YT,
                                int64_t rows_y, int64_t nv, bool upper, float* acc) {
  for (int64_t i0 = 0; i0 < rows_x; i0 += 4) {
    for (int64_t j0 = upper ? i0 : 0; j0 < rows_y; j0 += 4) {
      __m512 c[4][4];
#pragma GCC unroll 4
      for (int a = 0; a < 4; ++a)
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) c[a][b] = _mm512_loadu_ps(acc + ((i0 + a) * rows_y + j0 + b) * kLanes);
      for (int64_t v = 0; v < nv; ++v) {
        __m512 x[4], y[4];
#pragma GCC unroll 4
        for (int a = 0; a < 4; ++a) {
          x[a] = _mm512_loadu_ps(XT + (i0 + a) * S + v * kLanes);
          y[a] = _mm512_loadu_ps(YT + (j0 + a) * S + v * kLanes);
        }
#pragma GCC unroll 4
        for (int a = 0; a < 4; ++a)
#pragma GCC unroll 4
          for (int b = 0; b < 4; ++b) c[a][b] = _mm512_fmadd_ps(x[a], y[b], c[a][b]);
      }
#pragma GCC unroll 4
      for (int a = 0; a < 4; ++a)
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) _mm512_storeu_ps(acc + ((i0 + a) * rows_y + j0 + b) * kLanes, c[a][b]);
    }
  }
}

}  // namespace

void narrow_forward(const NarrowWeights& w, const float* z, int64_t n, float* f, float* r,
                    float* q, NarrowWorkspace& ws) {
  for (int64_t b0 = 0; b0 < n; b0 += S) {
    const int64_t ns = std::min(S, n - b0);
    const int64_t nv = vectors_for(ns);
    load_transposed(z + b0 * w.d, w.d, w.d, ns, nv, ws.zT.data());
    product<Epilogue::kRelu>(w.W.data(), w.d, w.Kp, w.k, w.d, ws.zT.data(), nv, ws.rT.data());
    if (q != nullptr) {  // q itself is kept for the backward
      product<Epilogue::kStore>(w.Q.data(), w.Kp, w.Kp, w.k, w.Kp, ws.rT.data(), nv, ws.qT.data());
      row_dots(ws.rT.data(), ws.qT.data(), w.Kp, nv, ws.g.data());
      store_transposed(ws.rT.data(), w.k, ns, r + b0 * w.k, w.k);
      store_transposed(ws.qT.data(), w.k, ns, q + b0 * w.k, w.k);
    } else {  // f = rᵀ Q r from Q's upper triangle (symmetry: about half the work)
      product<Epilogue::kQuadForm>(w.Qupper.data(), w.Kp, w.Kp, w.k, w.Kp, ws.rT.data(), nv,
                                   ws.g.data());
    }
    std::copy(ws.g.data(), ws.g.data() + ns, f + b0);
  }
}

void narrow_backward(const NarrowWeights& w, const float* z, const float* g,
                     const float* r, const float* q, int64_t n, bool want_dW,
                     bool want_gram, float* dz, NarrowWorkspace& ws) {
  for (int64_t b0 = 0; b0 < n; b0 += S) {
    const int64_t ns = std::min(S, n - b0);
    const int64_t nv = vectors_for(ns);
    std::fill(ws.g.begin(), ws.g.end(), 0.f);  // padding samples get g = 0
    std::copy(g + b0, g + b0 + ns, ws.g.data());
    load_transposed(z + b0 * w.d, w.d, w.d, ns, nv, ws.zT.data());
    if (r != nullptr) {
      load_transposed(r + b0 * w.k, w.k, w.k, ns, nv, ws.rT.data());
      load_transposed(q + b0 * w.k, w.k, w.k, ns, nv, ws.qT.data());
      relu_grad(ws.g.data(), ws.rT.data(), ws.qT.data(), w.Kp, nv, ws.pT.data(), ws.grT.data());
    } else {
      product<Epilogue::kRelu>(w.W.data(), w.d, w.Kp, w.k, w.d, ws.zT.data(), nv, ws.rT.data());
      product<Epilogue::kReluGrad>(w.Q.data(), w.Kp, w.Kp, w.k, w.Kp, ws.rT.data(), nv, ws.pT.data(),
                                   ws.g.data(), ws.grT.data());
    }
    if (want_dW) accumulate_outer(ws.pT.data(), w.Kp, ws.zT.data(), w.Dp, nv, false, ws.dW.data());
    if (want_gram) accumulate_outer(ws.grT.data(), w.Kp, ws.rT.data(), w.Kp, nv, true, ws.gram.data());
    if (dz != nullptr) {  // dzT = Wᵀ pT, written over zT (its padding rows come out zero)
      product<Epilogue::kStore>(w.WT.data(), w.Kp, w.Dp, w.d, w.Kp, ws.pT.data(), nv, ws.zT.data());
      store_transposed(ws.zT.data(), w.d, ns, dz + b0 * w.d, w.d);
    }
  }
}

#else  // no AVX-512 kernels in this build: avx512_kernels_supported() is false

void narrow_forward(const NarrowWeights&, const float*, int64_t, float*, float*, float*,
                    NarrowWorkspace&) {
  TORCH_CHECK(false, "torchext: narrow AVX-512 kernels are not built for this CPU");
}

void narrow_backward(const NarrowWeights&, const float*, const float*, const float*,
                     const float*, int64_t, bool, bool, float*, NarrowWorkspace&) {
  TORCH_CHECK(false, "torchext: narrow AVX-512 kernels are not built for this CPU");
}

#endif

}  // namespace cpu
}  // namespace torchext
