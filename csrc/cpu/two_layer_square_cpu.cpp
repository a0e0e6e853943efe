// CPU kernels for every plan. The batch is cut into chunks of rows (see
// BatchPlan) whose working set (x, r, q and the head's vectors) stays in cache
// while BLAS products run on it; chunks (forward) or partitions of chunks
// (backward, each with its own partial weight gradients, summed in a fixed
// order) run in parallel.
#include "../head.h"
#include "../kernel_frames.h"
#include "two_layer_square_cpu.h"
#include "avx512.h"
#include "avx512_gemm.h"
#include "narrow_kernels.h"
#include "portability.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>


#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

// Fortran BLAS of the BLAS library that torch links (MKL on x86 wheels,
// OpenBLAS elsewhere). Weak, so a torch without these symbols still loads us
// and gets the portable loops below instead (portability.h: where weak
// symbols do not exist, those loops always run).
#if TORCHEXT_WEAK_BLAS
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*,
            const float*, const float*, const int*, const float*, const int*,
            const float*, float*, const int*) TORCHEXT_WEAK;
void dgemm_(const char*, const char*, const int*, const int*, const int*,
            const double*, const double*, const int*, const double*,
            const int*, const double*, double*, const int*) TORCHEXT_WEAK;
// MKL's per-thread thread count (absent with other BLAS libraries).
int MKL_Set_Num_Threads_Local(int) TORCHEXT_WEAK;  // C interface (by value)
}
#else
#define sgemm_ nullptr
#define dgemm_ nullptr
#define MKL_Set_Num_Threads_Local static_cast<int (*)(int)>(nullptr)
#endif

namespace torchext {
namespace {

// Working set of one chunk: about this many elements (a per-core L2), and
// never fewer rows than kChunkMinRows.
constexpr int64_t kChunkScratchElems = int64_t{1} << 17;
constexpr int64_t kChunkMinRows = 256;
constexpr int64_t kMaxPartitions = 8;

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*,
                             const int*, const T*, const T*, const int*,
                             const T*, const int*, const T*, T*, const int*);
template <typename T>
FortranGemm<T> fortran_gemm();
template <>
FortranGemm<float> fortran_gemm<float>() { return sgemm_; }
template <>
FortranGemm<double> fortran_gemm<double>() { return dgemm_; }

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

// Row-major C(MxN) = op(A)(MxK) * op(B)(KxN) + beta * C, beta 0 or 1:
// float32 with B untransposed on the AVX-512 kernel where the CPU has it
// (avx512_gemm.h says why), else BLAS. BLAS is column-major, so it computes
// C^T = op(B)^T op(A)^T. Degenerate sizes never reach BLAS.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
             const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
             int64_t ldc) {
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    if (!trans_b && cpu::avx512_kernels_supported()) {
      cpu::gemm_avx512(trans_a, M, N, K, A, lda, B, ldb, beta != 0.f, C, ldc);
      return;
    }
  }
  auto blas = fortran_gemm<T>();
  if (K > 0 && blas != nullptr && fits_int(M) && fits_int(N) && fits_int(K) &&
      fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K);
    const int la = int(ldb), lb = int(lda), lc = int(ldc);
    const T one = T(1);
    blas(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
    for (int64_t p = 0; p < K; ++p) {
      const T av = trans_a ? A[p * lda + i] : A[i * lda + p];
      if (trans_b) {
        for (int64_t j = 0; j < N; ++j) c[j] += av * B[j * ldb + p];
      } else {
        const T* b = B + p * ldb;
        for (int64_t j = 0; j < N; ++j) c[j] += av * b[j];
      }
    }
  }
}

// The saved r and q (and dz) are large, freshly allocated outputs written
// once per call; first-touch page faults on them can cost as much as the
// arithmetic. Where transparent huge pages are on "madvise", ask for them on
// the 2 MiB-aligned interior of such a buffer (memory this call owns).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Elementwise loops over whole chunks, on restrict pointers and without
// branches so that they vectorise (a data-dependent branch per element costs
// more than the BLAS products at narrow widths).

// Our parallelism is the batch plan's (chunks, partitions); BLAS stays
// sequential inside it. Inside an OpenMP region MKL is sequential anyway; this
// also covers the single-chunk case that runs on the calling thread, where MKL
// would otherwise fork threads for every small product (and change how a
// product is split with the machine's thread count).
class SequentialBlas {
 public:
  SequentialBlas() : active_(MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (active_) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  bool active_;
  int previous_ = 0;
};

// A 2-D operand as gemm_rm reads it: row-major, or the transpose of a
// row-major matrix (other layouts are copied).
template <typename T>
struct GemmOperand {
  at::Tensor storage;
  bool trans;
  int64_t ld;
  explicit GemmOperand(const at::Tensor& t) {
    if (t.is_contiguous()) {
      storage = t, trans = false, ld = std::max<int64_t>(1, t.size(1));
    } else if (t.t().is_contiguous()) {
      storage = t, trans = true, ld = std::max<int64_t>(1, t.size(0));
    } else {
      storage = t.contiguous(), trans = false, ld = std::max<int64_t>(1, t.size(1));
    }
  }
  // Row i of the operand (as the product reads it) starts here.
  const T* row(int64_t i) const { return storage.template const_data_ptr<T>() + (trans ? i : i * ld); }
};

// The per-call products of the head (M, Q, and dV, dB, dA from the Gram): a
// b in blocks of kMatmulBlockRows output rows, each one sequential BLAS call,
// the blocks in parallel. The blocks depend on the shapes alone, so the
// result does not depend on the thread count (at::mm's does, for MKL's small
// products) while wide heads still use every core.
constexpr int64_t kMatmulBlockRows = 64;

template <typename T>
void blocked_mm(const GemmOperand<T>& a, const GemmOperand<T>& b, int64_t M, int64_t N,
                int64_t K, T* c) {
  const SequentialBlas sequential_blas;
  const int64_t blocks = (M + kMatmulBlockRows - 1) / kMatmulBlockRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, kMatmulBlockRows * N * K));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kMatmulBlockRows;
      const int64_t rows = std::min(kMatmulBlockRows, M - i0);
      gemm_rm<T>(a.trans, b.trans, rows, N, K, a.row(i0), a.ld, b.row(0), b.ld, T(0), c + i0 * N, N);
    }
  });
}

at::Tensor cpu_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0));
  at::Tensor out = uninitialized({a.size(0), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "torchext_cpu_mm", [&] {
    blocked_mm<scalar_t>(GemmOperand<scalar_t>(a), GemmOperand<scalar_t>(b.contiguous()), a.size(0), b.size(1),
                         a.size(1), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// torch.relu semantics, in place: NaN stays NaN (max(x, 0) would give 0).
template <typename T>
void relu_inplace(T* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    x[i] = (v > T(0) || v != v) ? v : T(0);
  }
}

// p = (2 g_i q_ij) where not r_ij <= 0, else 0: ReLU's derivative as torch's
// threshold_backward — a select, so a NaN upstream stays out of inactive
// units, and a NaN unit (r NaN) passes its gradient through.
template <typename T>
void relu_grad_rows(int64_t n, int64_t k, const T* __restrict__ g,
                    const T* __restrict__ q, const T* __restrict__ r,
                    T* __restrict__ p) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = T(2) * g[i];
    for (int64_t j = 0; j < k; ++j) {
      const T v = s * q[i * k + j];
      p[i * k + j] = r[i * k + j] <= T(0) ? T(0) : v;
    }
  }
}

// p = p where not r <= 0, else 0 (threshold_backward on a ready gradient).
template <typename T>
void relu_grad_inplace(int64_t n, const T* __restrict__ r, T* __restrict__ p) {
  for (int64_t i = 0; i < n; ++i) p[i] = r[i] <= T(0) ? T(0) : p[i];
}

// out_ij = g_i x_ij
template <typename T>
void scale_rows(int64_t n, int64_t k, const T* __restrict__ g,
                const T* __restrict__ x, T* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) {
    const T s = g[i];
    for (int64_t j = 0; j < k; ++j) out[i * k + j] = s * x[i * k + j];
  }
}

// y_ij *= a_j
template <typename T>
void scale_cols(int64_t n, int64_t ell, const T* __restrict__ a, T* __restrict__ y) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < ell; ++j) y[i * ell + j] *= a[j];
}

// f_i = Σ_j x_ij w_ij over j < k, rows ld apart (w = x for squares, times a_j
// when a is given). Sixteen partial sums per row, combined in a fixed tree: a
// single running sum would be a chain of dependent additions (the slowest
// loop of the forward at k = 128), and a fixed order keeps the result
// reproducible.
template <typename T>
void row_dots(int64_t n, int64_t k, int64_t ld, const T* __restrict__ x,
              const T* __restrict__ w, const T* __restrict__ a,
              T* __restrict__ f) {
  constexpr int64_t L = 16;
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * ld;
    const T* wi = w + i * ld;
    T acc[L] = {};
    int64_t j = 0;
    if (a != nullptr) {
      for (; j + L <= k; j += L)
        for (int64_t l = 0; l < L; ++l) acc[l] += a[j + l] * (xi[j + l] * wi[j + l]);
      for (int64_t l = 0; j < k; ++j, ++l) acc[l] += a[j] * (xi[j] * wi[j]);
    } else {
      for (; j + L <= k; j += L)
        for (int64_t l = 0; l < L; ++l) acc[l] += xi[j + l] * wi[j + l];
      for (int64_t l = 0; j < k; ++j, ++l) acc[l] += xi[j] * wi[j];
    }
    for (int64_t width = L / 2; width > 0; width /= 2)
      for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
    f[i] = acc[0];
  }
}

// Gram blocks: only blocks on or above the diagonal are multiplied (about
// half the work of a full product), the rest is mirrored at the end.
constexpr int64_t kGramBlock = 32;

// Memory for a thread's chunk buffers, kept across calls and grown on demand
// up to kArenaKeepBytes (larger requests, from very wide layers whose work
// dwarfs an allocation, are freed after the call). Allocating — zero-filling,
// and for large chunks page-faulting — them on every call cost as much as one
// of the BLAS products at medium sizes, and the tiny-N case (z a single
// vector) needs no allocation after the first call. Taken once per thread by
// a kernel, never re-entrantly; each Tag has its own memory.
constexpr size_t kArenaKeepBytes = size_t{8} << 20;

template <typename Tag>
class ThreadArena {
 public:
  char* get(size_t bytes) {
    thread_local std::unique_ptr<char[]> kept;
    thread_local size_t kept_bytes = 0;
    if (bytes <= kept_bytes) return kept.get();
    if (bytes <= kArenaKeepBytes) {
      kept.reset(new char[bytes]);
      kept_bytes = bytes;
      return kept.get();
    }
    oversized_.reset(new char[bytes]);
    return oversized_.get();
  }

 private:
  std::unique_ptr<char[]> oversized_;
};

// Elements rounded up to 16: parts carved from one block start 64 bytes apart.
inline int64_t padded_elems(int64_t elems) { return (elems + 15) / 16 * 16; }

// `elems` elements of T from a thread arena, 64-byte aligned; uninitialised
// (holding an earlier call's data), or NaN while tests poison (see uninitialized).
template <typename T, typename Tag>
T* aligned_block(ThreadArena<Tag>& arena, int64_t elems) {
  char* raw = arena.get(sizeof(T) * size_t(elems) + 64);
  T* block = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t{63});
  if (poisoning_uninitialized()) std::fill(block, block + elems, std::numeric_limits<T>::quiet_NaN());
  return block;
}

// Per-thread buffers for one chunk of `rows` rows, uninitialised; only those
// the plan uses get space (u: direct; y: direct and folded).
template <typename T>
struct ChunkScratch {
  ThreadArena<struct ChunkBuffersTag> arena;
  T *r, *q, *u, *y, *p, *f;
  ChunkScratch(const Dims& d, Plan plan, int64_t rows) {
    const int64_t nr = padded_elems(rows * d.k),
                  nu = plan == Plan::kDirect ? padded_elems(rows * d.m) : 0,
                  ny = plan == Plan::kQuadratic ? 0 : padded_elems(rows * d.ell),
                  nf = padded_elems(rows);
    r = aligned_block<T>(arena, 3 * nr + nu + ny + nf);
    q = r + nr;
    p = q + nr;
    u = p + nr;
    y = u + nu;
    f = y + ny;
  }
};

// The operands' pointers, and row-major transposes (Wt = Wᵀ, ...) of the
// weights the chain multiplies by on the right (x = z Wᵀ, u = r Vᵀ, y = u Bᵀ,
// y = r Mᵀ, q = r Qᵀ): made once per call (in a thread arena: at the tiny
// sizes, allocating them cost more than transposing), they let every
// per-chunk product read B untransposed (what the AVX-512 kernel takes).
template <typename T>
struct Operands {
  const T *z, *W, *V, *B, *a, *M, *Q;
  const T *Wt = nullptr, *Vt = nullptr, *Bt = nullptr, *Mt = nullptr, *Qt = nullptr;
  ThreadArena<struct WeightCopiesTag> arena;  // holds Wt .. Qt
};

// Which of W, V and B the chain multiplies by (M and Q: whenever the head has them).
struct ChainWeights {
  bool W, V, B;
};

// T = Xᵀ for a contiguous rows × cols X.
template <typename T>
void transpose_into(const T* X, int64_t rows, int64_t cols, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu::avx512_kernels_supported()) {
      cpu::transpose_avx512(rows, cols, X, cols, out, rows);
      return;
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[j * rows + i] = X[i * cols + j];
}

template <typename T>
Operands<T> operands(const ComputeInputs& in, const Head& head, Plan plan, ChainWeights chain) {
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; };
  Operands<T> op{ptr(in.z), ptr(in.W), ptr(in.V), ptr(in.B), ptr(in.a), ptr(head.M), ptr(head.Q)};
  struct Wanted {
    const at::Tensor* t;
    const T** out;
  };
  const Wanted wanted[] = {{chain.W ? &in.W : nullptr, &op.Wt},
                           {chain.V ? &in.V : nullptr, &op.Vt},
                           {chain.B ? &in.B : nullptr, &op.Bt},
                           {plan == Plan::kFolded && head.M.defined() ? &head.M : nullptr, &op.Mt},
                           {plan == Plan::kQuadratic && head.Q.defined() ? &head.Q : nullptr, &op.Qt}};
  int64_t total = 0;
  for (const Wanted& w : wanted)
    if (w.t != nullptr) total += padded_elems(w.t->numel());
  if (total == 0) return op;
  T* next = aligned_block<T>(op.arena, total);
  for (const Wanted& w : wanted) {
    if (w.t == nullptr) continue;
    TORCH_INTERNAL_ASSERT(w.t->is_contiguous() && w.t->dim() == 2);
    transpose_into(w.t->template const_data_ptr<T>(), w.t->size(0), w.t->size(1), next);
    *w.out = next;
    next += padded_elems(w.t->numel());
  }
  return op;
}

// One chunk of the forward: r = relu(z Wᵀ), then the plan's head gives f and,
// when save, q = Mᵀ diag(a) M r in the plan's association order.
template <typename T>
void forward_chunk(const Dims& dims, Plan plan, const Operands<T>& op,
                   const T* zc, int64_t n, bool save, T* f, T* r, T* q,
                   ChunkScratch<T>& s) {
  const int64_t d = dims.d, k = dims.k, m = dims.m, ell = dims.ell;
  gemm_rm<T>(false, false, n, k, d, zc, d, op.Wt, k, T(0), r, k);
  relu_inplace(r, n * k);
  T* y = s.y;
  switch (plan) {
    case Plan::kDirect: {
      // Saving, y goes straight into the q slot (see Plan), else zeros.
      const bool keep_y = save && direct_saves_y(dims);
      T* yd = keep_y ? q : y;
      const int64_t ldy = keep_y ? k : ell;
      gemm_rm<T>(false, false, n, m, k, r, k, op.Vt, m, T(0), s.u, m);
      gemm_rm<T>(false, false, n, ell, m, s.u, m, op.Bt, ell, T(0), yd, ldy);
      row_dots(n, ell, ldy, yd, yd, op.a, f);
      if (keep_y) {
        for (int64_t i = 0; i < n; ++i) std::fill(q + i * k + ell, q + (i + 1) * k, T(0));
      } else if (save) {
        std::fill(q, q + n * k, T(0));
      }
      break;
    }
    case Plan::kFolded:
      gemm_rm<T>(false, false, n, ell, k, r, k, op.Mt, ell, T(0), y, ell);
      row_dots(n, ell, ell, y, y, op.a, f);
      if (save) {  // q = Mᵀ (a ⊙ y)
        scale_cols(n, ell, op.a, y);
        gemm_rm<T>(false, false, n, k, ell, y, ell, op.M, k, T(0), q, k);
      }
      break;
    case Plan::kQuadratic:
      gemm_rm<T>(false, false, n, k, k, r, k, op.Qt, k, T(0), q, k);
      row_dots<T>(n, k, k, r, q, nullptr, f);
      break;
  }
}

// The quadratic plan of narrow float32 layers runs the AVX-512 kernels of
// narrow_kernels.h where the CPU has them (see there for why): their weights,
// or nullopt for the BLAS kernels below. (op.Q is null when the backward has
// saved q and needs no Q.)
template <typename T>
std::optional<cpu::NarrowWeights> narrow_weights(const Dims& dims, Plan plan,
                                                 const Operands<T>& op) {
  if constexpr (std::is_same_v<T, float>) {
    if (plan == Plan::kQuadratic && dims.k <= cpu::kNarrowMaxK && dims.d <= cpu::kNarrowMaxD &&
        cpu::avx512_kernels_supported())
      return cpu::NarrowWeights(dims.d, dims.k, op.W, op.Q);
  }
  return std::nullopt;
}

// A thread's buffers: the narrow kernels' workspace (accumulate: with room
// for the backward's partial sums), or the BLAS kernels' chunk scratch.
template <typename T>
struct ThreadBuffers {
  std::optional<ChunkScratch<T>> scratch;
  std::optional<cpu::NarrowWorkspace> workspace;
  ThreadBuffers(const std::optional<cpu::NarrowWeights>& narrow, const Dims& dims, Plan plan,
                int64_t rows, bool accumulate) {
    if (narrow) {
      workspace.emplace(*narrow, accumulate);
    } else {
      scratch.emplace(dims, plan, rows);
    }
  }
};

// A chunk's rows of the incoming gradient g (stride 1 or 0, see
// grad_to_compute): a pointer into g, or the broadcast value spread over a
// per-thread buffer of the chunk's length.
template <typename T>
class ChunkGrad {
 public:
  ChunkGrad(const at::Tensor& g, int64_t rows)
      : g_(g.const_data_ptr<T>()), broadcast_(grad_stride(g) == 0 && g.size(0) > 1) {
    if (broadcast_) {
      fill_ = aligned_block<T>(arena_, rows);
      std::fill(fill_, fill_ + rows, g_[0]);
    }
  }
  const T* rows(int64_t r0) const { return broadcast_ ? fill_ : g_ + r0; }

 private:
  ThreadArena<struct ChunkGradTag> arena_;
  const T* g_;
  bool broadcast_;
  T* fill_ = nullptr;
};

template <typename T>
void forward_impl(const Dims& dims, const ComputeInputs& in, Plan plan,
                  ForwardOutputs& out) {
  const BatchPlan bp =
      make_batch_plan(dims, plan, kChunkScratchElems, kChunkMinRows, kMaxPartitions);
  const Head head = fold_head(in, plan, &cpu_mm);
  const bool direct = plan == Plan::kDirect;
  const Operands<T> op = operands<T>(in, head, plan, {true, direct, direct});
  const bool save = out.r.size(0) == dims.N;
  T* f = out.f.mutable_data_ptr<T>();
  if (save) {
    advise_huge_pages(out.r);
    advise_huge_pages(out.q);
  }
  T* r_saved = save ? out.r.mutable_data_ptr<T>() : nullptr;
  T* q_saved = save ? out.q.mutable_data_ptr<T>() : nullptr;
  const std::optional<cpu::NarrowWeights> narrow = narrow_weights<T>(dims, plan, op);
  // No reduction across samples here, so chunks are the unit of parallelism.
  const SequentialBlas sequential_blas;
  at::parallel_for(0, bp.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    ThreadBuffers<T> buffers(narrow, dims, plan, std::min(bp.chunk_rows, dims.N),
                             /*accumulate=*/false);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * bp.chunk_rows;
      const int64_t n = std::min(bp.chunk_rows, dims.N - r0);
      if constexpr (std::is_same_v<T, float>) {
        if (narrow) {
          cpu::narrow_forward(*narrow, op.z + r0 * dims.d, n, f + r0,
                              save ? r_saved + r0 * dims.k : nullptr,
                              save ? q_saved + r0 * dims.k : nullptr, *buffers.workspace);
          continue;
        }
      }
      ChunkScratch<T>& s = *buffers.scratch;
      T* r = save ? r_saved + r0 * dims.k : s.r;
      T* q = save ? q_saved + r0 * dims.k : s.q;
      forward_chunk(dims, plan, op, op.z + r0 * dims.d, n, save, f + r0, r, q, s);
    }
  });
}

template <typename T>
void backward_impl(const Dims& dims, const ComputeInputs& in,
                   const at::Tensor& grad, const at::Tensor& r_saved,
                   const at::Tensor& q_saved, Plan plan, const OutputMask& mask,
                   GradBuffers& bufs) {
  const BatchPlan bp =
      make_batch_plan(dims, plan, kChunkScratchElems, kChunkMinRows, kMaxPartitions);
  const int64_t d = dims.d, k = dims.k, m = dims.m, ell = dims.ell;
  // Without saved r and q (see keeps_saved), each chunk recomputes them.
  const bool recompute = !r_saved.defined();
  const Head head = recompute ? fold_head(in, plan, &cpu_mm) : Head{};
  const bool direct = plan == Plan::kDirect;
  const bool saved_y = direct && !recompute && direct_saves_y(dims);
  const Operands<T> op = operands<T>(
      in, head, plan, {recompute, direct && (!saved_y || mask[kB]), direct && !saved_y});
  const T* rs = recompute ? nullptr : r_saved.const_data_ptr<T>();
  const T* qs = recompute ? nullptr : q_saved.const_data_ptr<T>();
  if (mask[kZ]) advise_huge_pages(bufs.acc[kZ]);
  T* gz = mask[kZ] ? bufs.acc[kZ].mutable_data_ptr<T>() : nullptr;
  const bool need_p = mask[kZ] || mask[kW];
  const bool need_head = mask[kV] || mask[kB] || mask[kA];
  const bool use_gram = need_head && plan != Plan::kDirect;

  // What each partition accumulates: dW, and either the Gram (k×k) or the
  // direct chain's dV, dB, dA. Partition 0 writes into the results (or the
  // Gram) directly, the others into partials added in partition order; a
  // partition's first chunk writes its slots (nothing is zero-filled: the
  // buffers come uninitialised, see internal_backward), later chunks add.
  enum Slot { kSlotW, kSlotV, kSlotB, kSlotA, kSlotGram, kSlots };
  at::Tensor gram = use_gram ? uninitialized({k, k}, in.z.options()) : at::Tensor();
  std::array<at::Tensor, kSlots> total = {
      mask[kW] ? bufs.acc[kW] : at::Tensor(),
      mask[kV] && !use_gram ? bufs.acc[kV] : at::Tensor(),
      mask[kB] && !use_gram ? bufs.acc[kB] : at::Tensor(),
      mask[kA] && !use_gram ? bufs.acc[kA] : at::Tensor(), gram};
  std::vector<std::array<at::Tensor, kSlots>> partials(bp.partitions);
  for (int64_t p = 0; p < bp.partitions; ++p)
    for (int i = 0; i < kSlots; ++i)
      if (total[i].defined())
        partials[p][i] = p == 0 ? total[i] : uninitialized(total[i].sizes(), total[i].options());

  const std::optional<cpu::NarrowWeights> narrow = narrow_weights<T>(dims, plan, op);

  {
  const SequentialBlas sequential_blas;
  at::parallel_for(0, bp.partitions, 1, [&](int64_t p0, int64_t p1) {
    const int64_t rows = std::min(bp.chunk_rows, dims.N);
    ThreadBuffers<T> buffers(narrow, dims, plan, rows, /*accumulate=*/true);
    const ChunkGrad<T> chunk_grad(grad, rows);
    for (int64_t part = p0; part < p1; ++part) {
      auto slot = [&](int i) -> T* {
        return partials[part][i].defined() ? partials[part][i].template mutable_data_ptr<T>() : nullptr;
      };
      T *gW = slot(kSlotW), *gV = slot(kSlotV), *gB = slot(kSlotB),
        *gA = slot(kSlotA), *G = slot(kSlotGram);
      const int64_t c_begin = part * bp.chunks_per_partition;
      const int64_t c_end = std::min(bp.num_chunks, c_begin + bp.chunks_per_partition);
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t r0 = c * bp.chunk_rows;
        const int64_t n = std::min(bp.chunk_rows, dims.N - r0);
        const T* zc = op.z + r0 * d;
        const T* gc = chunk_grad.rows(r0);
        const T beta = c == c_begin ? T(0) : T(1);  // first chunk writes, later ones add
        if constexpr (std::is_same_v<T, float>) {
          if (narrow) {  // the whole chain, accumulating into the workspace
            cpu::narrow_backward(*narrow, zc, gc, recompute ? nullptr : rs + r0 * k,
                                 recompute ? nullptr : qs + r0 * k, n, gW != nullptr, G != nullptr,
                                 gz ? gz + r0 * d : nullptr, *buffers.workspace);
            continue;
          }
        }
        ChunkScratch<T>& s = *buffers.scratch;
        const T* r = recompute ? s.r : rs + r0 * k;
        const T* q = recompute ? s.q : qs + r0 * k;
        if (recompute && direct) {  // the direct chain below needs r only
          gemm_rm<T>(false, false, n, k, d, zc, d, op.Wt, k, T(0), s.r, k);
          relu_inplace(s.r, n * k);
        } else if (recompute) {
          forward_chunk(dims, plan, op, zc, n, /*save=*/need_p, s.f, s.r,
                        s.q, s);
        }
        T* pbuf = s.p;
        if (direct) {
          // The chain in the eager association order, from the saved y when
          // there is one: u = V r (then only for dB), y = B u,
          // e = 2 g a ⊙ y, gu = Bᵀ e, gr = Vᵀ gu.
          T* u = s.u;
          T* y = s.y;
          if (!saved_y || gB) gemm_rm<T>(false, false, n, m, k, r, k, op.Vt, m, T(0), u, m);
          if (!saved_y) gemm_rm<T>(false, false, n, ell, m, u, m, op.Bt, ell, T(0), y, ell);
          const T* y_in = saved_y ? q : y;
          const int64_t ld_in = saved_y ? k : ell;
          if (gA) {
            if (c == c_begin) std::fill(gA, gA + ell, T(0));
            for (int64_t i = 0; i < n; ++i)
              for (int64_t j = 0; j < ell; ++j)
                gA[j] += gc[i] * (y_in[i * ld_in + j] * y_in[i * ld_in + j]);
          }
          for (int64_t i = 0; i < n; ++i)  // y becomes e = 2 g a ⊙ y
            for (int64_t j = 0; j < ell; ++j)
              y[i * ell + j] = T(2) * (gc[i] * op.a[j]) * y_in[i * ld_in + j];
          if (gB) gemm_rm<T>(true, false, ell, m, n, y, ell, u, m, beta, gB, m);
          if (!(gV || need_p)) continue;
          gemm_rm<T>(false, false, n, m, ell, y, ell, op.B, m, T(0), u, m);  // u becomes gu
          if (gV) gemm_rm<T>(true, false, m, k, n, u, m, r, k, beta, gV, k);
          if (!need_p) continue;
          gemm_rm<T>(false, false, n, k, m, u, m, op.V, k, T(0), pbuf, k);  // gr
          relu_grad_inplace(n * k, r, pbuf);
        } else if (need_p) {  // p = 2 g q ⊙ 1[r > 0]
          relu_grad_rows(n, k, gc, q, r, pbuf);
        }
        if (need_p) {
          if (gW) gemm_rm<T>(true, false, k, d, n, pbuf, k, zc, d, beta, gW, d);
          if (gz) gemm_rm<T>(false, false, n, d, k, pbuf, k, op.W, d, T(0), gz + r0 * d, d);
        }
        if (use_gram) {  // G += (g ⊙ r)ᵀ r, upper block triangle only
          scale_rows(n, k, gc, r, pbuf);
          for (int64_t b0 = 0; b0 < k; b0 += kGramBlock) {
            const int64_t bn = std::min(kGramBlock, k - b0);
            gemm_rm<T>(true, false, bn, k - b0, n, pbuf + b0, k, r + b0, k, beta,
                       G + b0 * k + b0, k);
          }
        }
      }
      if constexpr (std::is_same_v<T, float>) {
        if (narrow) buffers.workspace->flush(*narrow, gW, G);  // writes the partition's sums
      }
    }
  });
  }

  for (int64_t p = 1; p < bp.partitions; ++p)
    for (int i = 0; i < kSlots; ++i)
      if (total[i].defined()) total[i].add_(partials[p][i]);

  if (use_gram) {
    T* G = gram.mutable_data_ptr<T>();
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < i; ++j) G[i * k + j] = G[j * k + i];
    add_grads_from_gram(in, head.M.defined() ? head.M : fold_head(in, Plan::kFolded, &cpu_mm).M,
                        gram, mask, bufs, &cpu_mm);
  }
}

void forward_kernel_cpu(const Dims& dims, const ComputeInputs& in, Plan plan,
                        ForwardOutputs& out) {
  AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_cpu", [&] {
    forward_impl<scalar_t>(dims, in, plan, out);
  });
}

void backward_kernel_cpu(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                         const at::Tensor& r, const at::Tensor& q, Plan plan,
                         const OutputMask& mask, GradBuffers& bufs) {
  AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cpu", [&] {
    backward_impl<scalar_t>(dims, in, g, r, q, plan, mask, bufs);
  });
}

}  // namespace

at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "_cpu_matmul: a and b must be 2-D; got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), "_cpu_matmul: a's columns (", a.size(1),
              ") must match b's rows (", b.size(0), ")");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "_cpu_matmul: a and b must both be float32 or both float64; got ", a.scalar_type(),
              " and ", b.scalar_type());
  return cpu_mm(a, b);
}

TORCH_LIBRARY_IMPL(torchext, CPU, m) {
  register_kernels<&forward_kernel_cpu, &backward_kernel_cpu>(m);
}

}  // namespace torchext
