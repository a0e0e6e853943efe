// The per-chunk algebra of each plan on the CPU: a chunk's buffers, the
// operands' pointers, and one chunk of the forward and of the backward.
#pragma once

#include "../buffers.h"
#include "../head.h"
#include "../plan.h"
#include "blas.h"
#include "elementwise.h"
#include "workspace.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace torchext {
namespace cpu {

// Rows of k elements ldp apart: k plus one cache line where k's rows are a
// multiple of 256 bytes. The backward's transposed-A products walk p and
// g ⊙ r down their columns; rows a multiple of 256 bytes apart fall in at
// most a quarter of L1's sets (64 sets of 64-byte lines), which such a walk
// overflows, while an odd number of lines apart they cycle through all of them.
template <typename T>
int64_t spread_stride(int64_t k) {
  constexpr int64_t line = 64 / int64_t(sizeof(T));
  return k > 0 && (k * int64_t(sizeof(T))) % 256 == 0 ? k + line : k;
}

// Per-thread buffers for one chunk of `rows` rows, uninitialised; only those
// the plan uses get space (u: direct; y: direct and folded; gr, the Gram's
// g ⊙ r: folded and quadratic). p and gr have rows ldp apart, the others
// are contiguous.
template <typename T>
struct ChunkScratch {
  ThreadArena<struct ChunkBuffersTag> arena;
  T *r, *q, *u, *y, *p, *gr, *f;
  int64_t ldp;
  ChunkScratch(const Dims& d, Plan plan, int64_t rows) : ldp(spread_stride<T>(d.k)) {
    const int64_t nr = padded_elems(rows * d.k), np = padded_elems(rows * ldp),
                  nu = plan == Plan::kDirect ? padded_elems(rows * d.m) : 0,
                  ny = plan == Plan::kQuadratic ? 0 : padded_elems(rows * d.ell),
                  ng = plan == Plan::kDirect ? 0 : np, nf = padded_elems(rows);
    r = aligned_block<T>(arena, 2 * nr + np + nu + ny + ng + nf);
    q = r + nr;
    p = q + nr;
    u = p + np;
    y = u + nu;
    gr = y + ny;
    f = gr + ng;
  }
};

// The operands' pointers. The chain multiplies by the weights on the right
// (x = z Wᵀ, u = r Vᵀ, y = u Bᵀ, y = r Mᵀ, q = r Qᵀ), reading them transposed.
template <typename T>
struct Operands {
  const T *z, *W, *V, *B, *a, *M, *Q;
};

template <typename T>
Operands<T> operands(const ComputeInputs& in, const Head& head) {
  // (the products take each weight's row length as its stride)
  auto ptr = [](const at::Tensor& t) {
    TORCH_INTERNAL_ASSERT(!t.defined() || t.is_contiguous());
    return t.defined() ? t.const_data_ptr<T>() : nullptr;
  };
  return {ptr(in.z), ptr(in.W), ptr(in.V), ptr(in.B), ptr(in.a), ptr(head.M), ptr(head.Q)};
}

// One chunk of the forward: r = relu(z Wᵀ), then the plan's head gives f and,
// when save, q = Mᵀ diag(a) M r in the plan's association order.
template <typename T>
void forward_chunk(const Dims& dims, Plan plan, const Operands<T>& op,
                   const T* zc, int64_t n, bool save, T* f, T* r, T* q,
                   ChunkScratch<T>& s) {
  const int64_t d = dims.d, k = dims.k, m = dims.m, ell = dims.ell;
  gemm_rm<T>(false, true, n, k, d, zc, d, op.W, d, T(0), r, k, GemmOutput::kRelu);
  T* y = s.y;
  switch (plan) {
    case Plan::kDirect: {
      // Saving, y goes straight into the q slot (see Plan), else zeros.
      const bool keep_y = save && direct_saves_y(dims);
      T* yd = keep_y ? q : y;
      const int64_t ldy = keep_y ? k : ell;
      gemm_rm<T>(false, true, n, m, k, r, k, op.V, k, T(0), s.u, m);
      gemm_rm<T>(false, true, n, ell, m, s.u, m, op.B, m, T(0), yd, ldy);
      row_dots(n, ell, ldy, yd, yd, op.a, f);
      if (keep_y) {
        for (int64_t i = 0; i < n; ++i) std::fill(q + i * k + ell, q + (i + 1) * k, T(0));
      } else if (save) {
        std::fill(q, q + n * k, T(0));
      }
      break;
    }
    case Plan::kFolded:
      gemm_rm<T>(false, true, n, ell, k, r, k, op.M, k, T(0), y, ell);
      row_dots(n, ell, ell, y, y, op.a, f);
      if (save) {  // q = Mᵀ (a ⊙ y)
        scale_cols(n, ell, op.a, y);
        gemm_rm<T>(false, false, n, k, ell, y, ell, op.M, k, T(0), q, k);
      }
      break;
    case Plan::kQuadratic:
      gemm_rm<T>(false, true, n, k, k, r, k, op.Q, k, T(0), q, k);
      row_dots<T>(n, k, k, r, q, nullptr, f);
      break;
  }
}


// What every backward chunk of one call shares.
template <typename T>
struct BackwardCall {
  const Dims& dims;
  Plan plan;
  const Operands<T>& op;
  const T* r_saved;  // the forward's r and q, unless recompute
  const T* q_saved;
  bool recompute;    // no saved r and q: each chunk recomputes them
  T* gz;             // dz (N × d), or null when not requested
  bool need_p;       // dz or dW requested
  bool use_gram;     // dV, dB or dA requested on the folded or quadratic plan
  bool saved_y;      // direct: q_saved holds y (see Plan)
};

// A partition's sums that its chunks accumulate into (null where not
// requested): dW, and either the direct chain's dV, dB, dA or the Gram.
template <typename T>
struct PartitionSlots {
  T *gW, *gV, *gB, *gA, *G;
};

// The direct plan's chain in eager's association order, from the saved y when
// there is one: u = V r (then only for dB), y = B u, e = 2 g a ⊙ y, gu = Bᵀ e
// and, when p is needed, p = Vᵀ gu masked by ReLU's derivative (into s.p).
// first: the partition's first chunk, which writes its slots; later ones add.
template <typename T>
void direct_chain_chunk(const BackwardCall<T>& call, const PartitionSlots<T>& sums, int64_t n,
                        const T* gc, const T* r, const T* q, bool first, ChunkScratch<T>& s) {
  const int64_t k = call.dims.k, m = call.dims.m, ell = call.dims.ell;
  const T beta = first ? T(0) : T(1);
  const Operands<T>& op = call.op;
  T* u = s.u;
  T* y = s.y;
  if (!call.saved_y || sums.gB) gemm_rm<T>(false, true, n, m, k, r, k, op.V, k, T(0), u, m);
  if (!call.saved_y) gemm_rm<T>(false, true, n, ell, m, u, m, op.B, m, T(0), y, ell);
  const T* y_in = call.saved_y ? q : y;
  const int64_t ld_in = call.saved_y ? k : ell;
  if (T* gA = sums.gA) {
    if (first) std::fill(gA, gA + ell, T(0));
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < ell; ++j)
        gA[j] += gc[i] * (y_in[i * ld_in + j] * y_in[i * ld_in + j]);
  }
  // y becomes e = 2 g a ⊙ y, as t + t with t = (g a) y: eager's order,
  // where 2 (g a) would overflow first (g near the dtype's limit; inf · 0 is
  // NaN). Doubling is exact otherwise.
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < ell; ++j) {
      const T t = (gc[i] * op.a[j]) * y_in[i * ld_in + j];
      y[i * ell + j] = t + t;
    }
  if (sums.gB) gemm_rm<T>(true, false, ell, m, n, y, ell, u, m, beta, sums.gB, m);
  if (!(sums.gV || call.need_p)) return;
  gemm_rm<T>(false, false, n, m, ell, y, ell, op.B, m, T(0), u, m);  // u becomes gu
  if (sums.gV) gemm_rm<T>(true, false, m, k, n, u, m, r, k, beta, sums.gV, k);
  if (!call.need_p) return;
  gemm_rm<T>(false, false, n, k, m, u, m, op.V, k, T(0), s.p, s.ldp);  // gr
  relu_grad_inplace(n, k, r, s.p, s.ldp);
}

// One chunk of the backward, rows [r0, r0 + n): r and q (saved, or
// recomputed), p = ∂(Σ g f)/∂x by the plan's route, then dz, and dW and the
// Gram (upper triangle only) into the partition's sums.
template <typename T>
void backward_chunk(const BackwardCall<T>& call, const PartitionSlots<T>& sums, int64_t r0,
                    int64_t n, const T* gc, bool first, ChunkScratch<T>& s) {
  const int64_t d = call.dims.d, k = call.dims.k;
  const Operands<T>& op = call.op;
  const T* zc = op.z + r0 * d;
  const T beta = first ? T(0) : T(1);  // first chunk writes, later ones add
  const bool recompute = call.recompute;
  const bool direct = call.plan == Plan::kDirect;
  const T* r = recompute ? s.r : call.r_saved + r0 * k;
  const T* q = recompute ? s.q : call.q_saved + r0 * k;
  if (recompute && direct) {  // the direct chain needs r only
    gemm_rm<T>(false, true, n, k, d, zc, d, op.W, d, T(0), s.r, k, GemmOutput::kRelu);
  } else if (recompute) {
    forward_chunk(call.dims, call.plan, op, zc, n, /*save=*/call.need_p, s.f, s.r, s.q, s);
  }
  T* p = s.p;
  if (direct) {
    direct_chain_chunk(call, sums, n, gc, r, q, first, s);
  } else {  // p = 2 g q ⊙ 1[r > 0], and the Gram's g ⊙ r
    relu_grads(n, k, gc, q, r, call.need_p ? p : nullptr, call.use_gram ? s.gr : nullptr, s.ldp);
  }
  if (call.need_p) {
    if (sums.gW) gemm_rm<T>(true, false, k, d, n, p, s.ldp, zc, d, beta, sums.gW, d);
    if (call.gz) gemm_rm<T>(false, false, n, d, k, p, s.ldp, op.W, d, T(0), call.gz + r0 * d, d);
  }
  if (call.use_gram)  // G += (g ⊙ r)ᵀ r, upper triangle only (mirrored at the end)
    gemm_rm<T>(true, false, k, k, n, s.gr, s.ldp, r, k, beta, sums.G, k, GemmOutput::kUpper);
}

}  // namespace cpu
}  // namespace torchext
