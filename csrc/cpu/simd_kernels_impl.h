// The SIMD kernels of simd_kernels.h, written once over the vector type V of
// simd_vec.h. Each simd_<set>.cpp includes this file inside its own namespace
// with V and TX (the set's target attribute) defined, as ATen compiles its
// kernels once per CPU capability; hence no include guard.
//
// Matrix product: C in register tiles of kGemmRows rows × kGemmVecs vectors,
// each step one broadcast of A per row and kGemmVecs loads of B; K in blocks
// of 256 summed into C in order, a column panel of B copied into a contiguous
// buffer that stays in L1 while the row tiles stream past it.
//
// Narrow chain: a block of kNarrowBlock samples is held feature-major, so a
// vector holds one feature of kLanes samples and no per-sample horizontal
// sums are needed. Products with the weights are tiled kChainRows units ×
// 2 vectors, the sample-summed outer products (dW, Gram) kOuterRows × 4
// units, accumulated lane-wise per partition (summed across lanes once per
// partition, in a fixed order, by the caller).

namespace kernels {

using R = V::R;
using M = V::M;
constexpr int64_t L = V::kLanes;
constexpr int64_t S = kNarrowBlock;
static_assert(S % (2 * L) == 0, "a block is whole pairs of vectors");
static_assert(8 % V::kChainRows == 0 && 8 % V::kOuterRows == 0, "tiles divide Kp and Dp");

// ---- matrix product ----

// C[t][0 .. NV·L) for t < MR: A's element (t, p) is A[t·a_row + p·a_inner].
// B: the packed panel (whole vectors, zero past the last column). Masked: C's
// columns past the panel's are masked off (loads 0, stores skip). Stored: the
// sum plus C's old value when st.add, relu'd when st.relu.
struct Store {
  bool add, relu;
};
template <int MR, int NV, bool Masked>
TX void tile(const float* A, int64_t a_row, int64_t a_inner, const float* B, int64_t ldb,
             int64_t K, const M (&mask)[V::kGemmVecs], Store st, float* C, int64_t ldc) {
  R c[MR][NV];
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[t][v] = V::zero();
  for (int64_t p = 0; p < K; ++p) {
    const float* b = B + p * ldb;
    R bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * L);
    const float* a = A + p * a_inner;
#pragma GCC unroll 8
    for (int t = 0; t < MR; ++t) {
      const R av = V::set1(a[t * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[t][v] = V::fma(av, bv[v], c[t][v]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < MR; ++t) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* out = C + t * ldc + v * L;
      if (st.add) c[t][v] = V::add(c[t][v], Masked ? V::load_first(mask[v], out) : V::load(out));
      if (st.relu) c[t][v] = V::relu(c[t][v]);
      if (Masked) {
        V::store_first(out, mask[v], c[t][v]);
      } else {
        V::store(out, c[t][v]);
      }
    }
  }
}

// A tile of `rows` rows, 1 <= rows <= kGemmRows (a run-time count to a template's).
template <int NV, bool Masked, int MR = V::kGemmRows>
TX void tile_rows(int rows, const float* A, int64_t a_row, int64_t a_inner, const float* B,
                  int64_t ldb, int64_t K, const M (&mask)[V::kGemmVecs], Store st, float* C,
                  int64_t ldc) {
  if constexpr (MR > 1) {
    if (rows < MR) {
      tile_rows<NV, Masked, MR - 1>(rows, A, a_row, a_inner, B, ldb, K, mask, st, C, ldc);
      return;
    }
  }
  tile<MR, NV, Masked>(A, a_row, a_inner, B, ldb, K, mask, st, C, ldc);
}

// One panel of NV vectors of columns, all rows: kGemmRows-row tiles. A tile
// of fewer than 4 rows has too few accumulators to hide the FMA latency, so a
// remainder under 4 rows is merged with the last whole tile and the two split
// in halves (6 + 2 = 4 + 4, 6 + 1 = 4 + 3, 8 + 3 = 6 + 5).
template <int NV, bool Masked>
TX void panel(int64_t Mrows, const float* A, int64_t a_row, int64_t a_inner, const float* B,
              int64_t ldb, int64_t K, const M (&mask)[V::kGemmVecs], Store st, float* C,
              int64_t ldc) {
  constexpr int MR = V::kGemmRows;
  const int64_t rest = Mrows % MR;
  const int64_t whole = Mrows / MR - (rest > 0 && rest < 4 && Mrows > MR ? 1 : 0);
  int64_t i = 0;
  for (; i < whole * MR; i += MR)
    tile<MR, NV, Masked>(A + i * a_row, a_row, a_inner, B, ldb, K, mask, st, C + i * ldc, ldc);
  for (int64_t left = Mrows - i; left > 0;) {
    const int rows = int(left > MR ? (left + 1) / 2 : left);
    tile_rows<NV, Masked>(rows, A + i * a_row, a_row, a_inner, B, ldb, K, mask, st, C + i * ldc, ldc);
    i += rows;
    left -= rows;
  }
}

// A ragged last panel of `vecs` vectors (1 <= vecs <= NV), masked.
template <int NV>
TX void ragged_panel(int vecs, int64_t Mrows, const float* A, int64_t a_row, int64_t a_inner,
                     const float* B, int64_t ldb, int64_t K, const M (&mask)[V::kGemmVecs],
                     Store st, float* C, int64_t ldc) {
  if constexpr (NV > 1) {
    if (vecs < NV) {
      ragged_panel<NV - 1>(vecs, Mrows, A, a_row, a_inner, B, ldb, K, mask, st, C, ldc);
      return;
    }
  }
  panel<NV, true>(Mrows, A, a_row, a_inner, B, ldb, K, mask, st, C, ldc);
}

// kLanes × kLanes tiles transposed in registers.
TX void transpose(int64_t rows, int64_t cols, const float* X, int64_t ldx, float* T, int64_t ldt) {
  for (int64_t i = 0; i < rows; i += L) {
    const int64_t ni = std::min(L, rows - i);
    const M in_rows = V::first(ni);
    for (int64_t j = 0; j < cols; j += L) {
      const int64_t nj = std::min(L, cols - j);
      R t[L];
      if (ni == L && nj == L) {  // a whole tile: plain loads and stores (masked ones are slow on AVX2)
#pragma GCC unroll 16
        for (int r = 0; r < L; ++r) t[r] = V::load(X + (i + r) * ldx + j);
        V::transpose(t);
#pragma GCC unroll 16
        for (int c = 0; c < L; ++c) V::store(T + (j + c) * ldt + i, t[c]);
        continue;
      }
      const M in_cols = V::first(nj);
#pragma GCC unroll 16
      for (int r = 0; r < L; ++r) t[r] = r < ni ? V::load_first(in_cols, X + (i + r) * ldx + j) : V::zero();
      V::transpose(t);
#pragma GCC unroll 16
      for (int c = 0; c < L; ++c)
        if (c < nj) V::store_first(T + (j + c) * ldt + i, in_rows, t[c]);
    }
  }
}

// B's rows [0, depth) of columns [0, cols) into a kPanel-wide contiguous
// panel, zero past cols: the tiles then read it with plain loads from L1
// (B's own rows are often a power-of-two stride apart, which maps them to a
// few L1 sets that a panel overflows). trans_b: B is given transposed, and
// its rows [0, cols) are transposed into the panel (the weights the chain
// multiplies by on the right need no transposed copy).
TX void pack_panel(const float* B, int64_t ldb, bool trans_b, int64_t depth, int64_t cols,
                   const M (&mask)[V::kGemmVecs], bool next_panel, float* out) {
  constexpr int NV = V::kGemmVecs;
  constexpr int64_t kPanel = NV * L;
  if (trans_b) {
    for (int64_t p = 0; cols < kPanel && p < depth; ++p)
      std::fill(out + p * kPanel + cols, out + (p + 1) * kPanel, 0.f);
    transpose(cols, depth, B, ldb, out, kPanel);
    return;
  }
  for (int64_t p = 0; p < depth; ++p) {
    const float* b = B + p * ldb;
    float* o = out + p * kPanel;
    // The next panel's part of this row: B is often fresh from memory, and
    // a column panel's rows are too far apart for the hardware prefetchers.
    if (next_panel)
      for (int64_t line = 0; line < kPanel; line += 16) __builtin_prefetch(b + kPanel + line);
    if (cols == kPanel) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(o + v * L, V::load(b + v * L));
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(o + v * L, V::load_first(mask[v], b + v * L));
    }
  }
}

TX void gemm(const GemmOptions& o, int64_t Mrows, int64_t N, int64_t K, const float* A,
             int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  if (Mrows <= 0 || N <= 0) return;
  constexpr int NV = V::kGemmVecs;
  constexpr int64_t kPanel = NV * L;
  constexpr int64_t kDepth = 256;
  alignas(64) float packed[kDepth * kPanel];
  const int64_t a_row = o.trans_a ? 1 : lda, a_inner = o.trans_a ? lda : 1;
  int64_t p = 0;
  do {
    const int64_t depth = std::min(kDepth, K - p);
    const Store st{o.accumulate || p > 0, o.relu && p + depth >= K};
    const float* Ap = A + p * a_inner;
    for (int64_t j = 0; j < N; j += kPanel) {
      const int64_t cols = std::min(kPanel, N - j);
      // upper: rows past the panel's last column are below the diagonal
      const int64_t rows = o.upper ? std::min(Mrows, j + cols) : Mrows;
      M mask[NV];
      for (int v = 0; v < NV; ++v) mask[v] = V::first(cols - v * L);
      const float* Bp = o.trans_b ? B + j * ldb + p : B + p * ldb + j;
      pack_panel(Bp, ldb, o.trans_b, depth, cols, mask, j + kPanel < N, packed);
      if (cols == kPanel)
        panel<NV, false>(rows, Ap, a_row, a_inner, packed, kPanel, depth, mask, st, C + j, ldc);
      else
        ragged_panel<NV>(int((cols + L - 1) / L), rows, Ap, a_row, a_inner, packed, kPanel, depth,
                         mask, st, C + j, ldc);
    }
    p += depth;
  } while (p < K);
}

// p = 2 g q where not r <= 0, else 0: threshold_backward's select, so a NaN
// unit passes its gradient and a NaN g stays out of inactive units. 2 g q as
// t + t, t = g q: 2 g overflows first for g near FLT_MAX (same bits otherwise).
TX inline R relu_grad_of(R g, R r, R q) {
  const R t = V::mul(g, q);
  return V::where_active(r, V::add(t, t));
}

// p (relu_grad_of) and gr = g r, each where not null, in one pass: q and r
// rows of k, p and gr rows ldo apart.
TX void relu_grads(int64_t n, int64_t k, const float* g, const float* q, const float* r, float* p,
                   float* gr, int64_t ldo) {
  const M tail = V::first(k % L);
  for (int64_t i = 0; i < n; ++i) {
    const R gv = V::set1(g[i]);
    const int64_t in = i * k, out = i * ldo;
    int64_t j = 0;
    for (; j + L <= k; j += L) {
      const R rv = V::load(r + in + j);
      if (p != nullptr) V::store(p + out + j, relu_grad_of(gv, rv, V::load(q + in + j)));
      if (gr != nullptr) V::store(gr + out + j, V::mul(gv, rv));
    }
    if (j == k) continue;
    const R rv = V::load_first(tail, r + in + j);
    if (p != nullptr) V::store_first(p + out + j, tail, relu_grad_of(gv, rv, V::load_first(tail, q + in + j)));
    if (gr != nullptr) V::store_first(gr + out + j, tail, V::mul(gv, rv));
  }
}

// ---- narrow chain ----

// Vectors a block of ns samples spans, rounded up to pairs.
inline int64_t vectors_for(int64_t ns) { return (ns + 2 * L - 1) / (2 * L) * 2; }

// T[c][s] = X[s][c] for c < cols and s < ns (X rows of `stride` floats); zero
// for the padding samples up to nv vectors. Whole tiles transposed in
// registers, ragged edges gathered.
TX void load_transposed(const float* X, int64_t stride, int64_t cols, int64_t ns, int64_t nv,
                        float* T) {
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t live = ns - v * L;
    if (live <= 0) {
      for (int64_t c = 0; c < cols; ++c) V::store(T + c * S + v * L, V::zero());
      continue;
    }
    const M m = V::first(live);
    const float* base = X + v * L * stride;
    int64_t c0 = 0;
    if (live >= L) {
      for (; c0 + L <= cols; c0 += L) {
        R t[L];
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) t[i] = V::load(base + i * stride + c0);
        V::transpose(t);
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) V::store(T + (c0 + i) * S + v * L, t[i]);
      }
    }
    for (int64_t c = c0; c < cols; ++c) V::store(T + c * S + v * L, V::gather_first(m, base + c, stride));
  }
}

// Samples [ns, nv·L) of `rows` rows zeroed: the padding of a block whose
// values a product computed from zero inputs, which is NaN wherever a weight
// is infinite (inf · 0), and would reach the sums over samples.
TX void zero_padding(float* T, int64_t rows, int64_t ns, int64_t nv) {
  const int64_t v0 = ns / L;
  const M live = V::first(ns - v0 * L);
  for (int64_t c = 0; c < rows; ++c) {
    float* row = T + c * S;
    if (v0 < nv) V::store(row + v0 * L, V::load_first(live, row + v0 * L));
    for (int64_t v = v0 + 1; v < nv; ++v) V::store(row + v * L, V::zero());
  }
}

// X[s][c] = T[c][s] for c < cols and s < ns.
TX void store_transposed(const float* T, int64_t cols, int64_t ns, float* X, int64_t stride) {
  for (int64_t v = 0; v * L < ns; ++v) {
    const int64_t live = ns - v * L;
    const M m = V::first(live);
    float* base = X + v * L * stride;
    int64_t c0 = 0;
    if (live >= L) {
      for (; c0 + L <= cols; c0 += L) {
        R t[L];
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) t[i] = V::load(T + (c0 + i) * S + v * L);
        V::transpose(t);
#pragma GCC unroll 16
        for (int i = 0; i < L; ++i) V::store(base + i * stride + c0, t[i]);
      }
    }
    for (int64_t c = c0; c < cols; ++c) V::scatter_first(base + c, stride, m, V::load(T + c * S + v * L));
  }
}

// One vector of samples of p (relu_grad_of) and of g r.
TX inline void store_relu_grad(R g, R r, R q, float* p, float* gr) {
  V::store(p, relu_grad_of(g, r, q));
  V::store(gr, V::mul(g, r));
}

// What a product does with its block of results acc[i][s] = Σ_j A[i][j] inT[j][s].
enum class Epilogue {
  kStore,     // outT = acc
  kRelu,      // outT = max(0, acc), keeping NaN
  kQuadForm,  // f[s] = Σ_i inT[i][s] acc[i][s] (A upper-triangular: row i from j = i on),
              // doubled when `doubled`
  kReluGrad,  // store_relu_grad with q = acc, r = inT: pT and grT
};

// The products of the per-sample chain over a block of nv vectors (in pairs):
// i < rows (a multiple of 8), j < inner; A row-major with leading dimension
// lda. Rows from `live` on are padding: their results are stored as zeros
// (kQuadForm skips them), never as A's zero row times the input, which is NaN
// where an input is infinite (0 · inf) and would reach every real result
// through the next product.
template <Epilogue E>
TX void product(const float* A, int64_t lda, int64_t rows, int64_t live, int64_t inner,
                const float* inT, int64_t nv, float* outT, const float* g = nullptr,
                float* grT = nullptr, bool doubled = false) {
  constexpr int MR = V::kChainRows;
  const R zero = V::zero();
  for (int64_t v = 0; v < nv; v += 2) {
    const int64_t s = v * L;
    R f0 = zero, f1 = zero, g0 = zero, g1 = zero;
    if constexpr (E == Epilogue::kReluGrad) {
      g0 = V::load(g + s);
      g1 = V::load(g + s + L);
    }
    for (int64_t i0 = 0; i0 < rows; i0 += MR) {
      R a0[MR], a1[MR];
#pragma GCC unroll 8
      for (int t = 0; t < MR; ++t) a0[t] = a1[t] = zero;
      const float* arow = A + i0 * lda;
      int64_t j = 0;
      if constexpr (E == Epilogue::kQuadForm) {
        // The tile's diagonal block: each row from its own column on, as the
        // zeros below A's diagonal times an infinite input would give NaN.
        for (j = i0; j < std::min(i0 + MR, inner); ++j) {
          const R x0 = V::load(inT + j * S + s);
          const R x1 = V::load(inT + j * S + s + L);
#pragma GCC unroll 8
          for (int t = 0; t < MR; ++t) {
            if (i0 + t > j) continue;
            const R b = V::set1(arow[t * lda + j]);
            a0[t] = V::fma(b, x0, a0[t]);
            a1[t] = V::fma(b, x1, a1[t]);
          }
        }
      }
      for (; j < inner; ++j) {
        const R x0 = V::load(inT + j * S + s);
        const R x1 = V::load(inT + j * S + s + L);
#pragma GCC unroll 8
        for (int t = 0; t < MR; ++t) {
          const R b = V::set1(arow[t * lda + j]);
          a0[t] = V::fma(b, x0, a0[t]);
          a1[t] = V::fma(b, x1, a1[t]);
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < MR; ++t) {
        const int64_t o = (i0 + t) * S + s;
        if (i0 + t >= live) {
          if constexpr (E != Epilogue::kQuadForm) {
            V::store(outT + o, zero);
            V::store(outT + o + L, zero);
          }
          if constexpr (E == Epilogue::kReluGrad) {
            V::store(grT + o, zero);
            V::store(grT + o + L, zero);
          }
        } else if constexpr (E == Epilogue::kStore) {
          V::store(outT + o, a0[t]);
          V::store(outT + o + L, a1[t]);
        } else if constexpr (E == Epilogue::kRelu) {
          V::store(outT + o, V::relu(a0[t]));
          V::store(outT + o + L, V::relu(a1[t]));
        } else if constexpr (E == Epilogue::kQuadForm) {
          f0 = V::fma(V::load(inT + o), a0[t], f0);
          f1 = V::fma(V::load(inT + o + L), a1[t], f1);
        } else {
          store_relu_grad(g0, V::load(inT + o), a0[t], outT + o, grT + o);
          store_relu_grad(g1, V::load(inT + o + L), a1[t], outT + o + L, grT + o + L);
        }
      }
    }
    if constexpr (E == Epilogue::kQuadForm) {
      V::store(outT + s, doubled ? V::add(f0, f0) : f0);
      V::store(outT + s + L, doubled ? V::add(f1, f1) : f1);
    }
  }
}

// f[s] = Σ_i rT[i][s] qT[i][s] (in unit order).
TX void row_dots(const float* rT, const float* qT, int64_t rows, int64_t nv, float* f) {
  for (int64_t v = 0; v < nv; ++v) {
    R acc = V::zero();
    for (int64_t i = 0; i < rows; ++i) acc = V::fma(V::load(rT + i * S + v * L), V::load(qT + i * S + v * L), acc);
    V::store(f + v * L, acc);
  }
}

// pT, grT from saved rT and qT (see store_relu_grad).
TX void relu_grad(const float* g, const float* rT, const float* qT, int64_t rows, int64_t nv,
                  float* pT, float* grT) {
  for (int64_t v = 0; v < nv; ++v) {
    const R gv = V::load(g + v * L);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t o = i * S + v * L;
      store_relu_grad(gv, V::load(rT + o), V::load(qT + o), pT + o, grT + o);
    }
  }
}

// acc[i][j] += XT[i] ⊙ YT[j] lane-wise, summed over the block's vectors, in
// kOuterRows × 4 tiles of units; upper: only the tiles that reach j >= i.
TX void accumulate_outer(const float* XT, int64_t rows_x, const float* YT, int64_t rows_y,
                         int64_t nv, bool upper, float* acc) {
  constexpr int MR = V::kOuterRows;
  for (int64_t i0 = 0; i0 < rows_x; i0 += MR) {
    for (int64_t j0 = upper ? i0 / 4 * 4 : 0; j0 < rows_y; j0 += 4) {
      R c[MR][4];
#pragma GCC unroll 4
      for (int a = 0; a < MR; ++a)
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) c[a][b] = V::load(acc + ((i0 + a) * rows_y + j0 + b) * L);
      for (int64_t v = 0; v < nv; ++v) {
        R x[MR], y[4];
#pragma GCC unroll 4
        for (int a = 0; a < MR; ++a) x[a] = V::load(XT + (i0 + a) * S + v * L);
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) y[b] = V::load(YT + (j0 + b) * S + v * L);
#pragma GCC unroll 4
        for (int a = 0; a < MR; ++a)
#pragma GCC unroll 4
          for (int b = 0; b < 4; ++b) c[a][b] = V::fma(x[a], y[b], c[a][b]);
      }
#pragma GCC unroll 4
      for (int a = 0; a < MR; ++a)
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) V::store(acc + ((i0 + a) * rows_y + j0 + b) * L, c[a][b]);
    }
  }
}

TX void narrow_forward(const NarrowWeights& w, const float* z, int64_t n, float* f, float* r,
                       float* q, const NarrowBuffers& b) {
  for (int64_t b0 = 0; b0 < n; b0 += S) {
    const int64_t ns = std::min(S, n - b0);
    const int64_t nv = vectors_for(ns);
    load_transposed(z + b0 * w.d, w.d, w.d, ns, nv, b.zT);
    product<Epilogue::kRelu>(w.W.data(), w.d, w.Kp, w.k, w.d, b.zT, nv, b.rT);
    if (q != nullptr) {  // q itself is kept for the backward
      product<Epilogue::kStore>(w.Q.data(), w.Kp, w.Kp, w.k, w.Kp, b.rT, nv, b.qT);
      row_dots(b.rT, b.qT, w.Kp, nv, b.g);
      store_transposed(b.rT, w.k, ns, r + b0 * w.k, w.k);
      store_transposed(b.qT, w.k, ns, q + b0 * w.k, w.k);
    } else {  // f = rᵀ Q r from Q's upper triangle (symmetry: about half the work)
      product<Epilogue::kQuadForm>(w.Qupper.data(), w.Kp, w.Kp, w.k, w.Kp, b.rT, nv, b.g,
                                   nullptr, nullptr, w.halved);
    }
    std::copy(b.g, b.g + ns, f + b0);
  }
}

TX void narrow_backward(const NarrowWeights& w, const float* z, const float* g, const float* r,
                        const float* q, int64_t n, bool want_dW, bool want_gram, float* dz,
                        const NarrowBuffers& b) {
  for (int64_t b0 = 0; b0 < n; b0 += S) {
    const int64_t ns = std::min(S, n - b0);
    const int64_t nv = vectors_for(ns);
    std::fill(b.g, b.g + S, 0.f);  // padding samples get g = 0
    std::copy(g + b0, g + b0 + ns, b.g);
    load_transposed(z + b0 * w.d, w.d, w.d, ns, nv, b.zT);
    if (r != nullptr) {
      load_transposed(r + b0 * w.k, w.k, w.k, ns, nv, b.rT);
      load_transposed(q + b0 * w.k, w.k, w.k, ns, nv, b.qT);
      relu_grad(b.g, b.rT, b.qT, w.Kp, nv, b.pT, b.grT);
    } else {
      product<Epilogue::kRelu>(w.W.data(), w.d, w.Kp, w.k, w.d, b.zT, nv, b.rT);
      zero_padding(b.rT, w.Kp, ns, nv);  // then p and g r are zero there too
      product<Epilogue::kReluGrad>(w.Q.data(), w.Kp, w.Kp, w.k, w.Kp, b.rT, nv, b.pT, b.g, b.grT);
    }
    if (want_dW) accumulate_outer(b.pT, w.Kp, b.zT, w.Dp, nv, false, b.dW);
    if (want_gram) accumulate_outer(b.grT, w.Kp, b.rT, w.Kp, nv, true, b.gram);
    if (dz != nullptr) {  // dzT = Wᵀ pT, written over zT (its padding rows come out zero)
      product<Epilogue::kStore>(w.WT.data(), w.Kp, w.Dp, w.d, w.Kp, b.pT, nv, b.zT);
      store_transposed(b.zT, w.d, ns, dz + b0 * w.d, w.d);
    }
  }
}

TX float fma_loop(int64_t iters) {
  R acc[kFmaChains];
  for (int64_t i = 0; i < kFmaChains; ++i) acc[i] = V::set1(1.f + 1e-6f * float(i));
  const R m = V::set1(0.999999f), c = V::set1(1e-6f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int64_t i = 0; i < kFmaChains; ++i) acc[i] = V::fma(acc[i], m, c);
  for (int64_t i = 1; i < kFmaChains; ++i) acc[0] = V::add(acc[0], acc[i]);
  alignas(64) float out[L];
  V::store(out, acc[0]);
  return out[0];
}

inline const SimdKernels* table(const char* name) {
  static const SimdKernels t{name, L, gemm, relu_grads, narrow_forward, narrow_backward,
                             fma_loop};
  return &t;
}

}  // namespace kernels
