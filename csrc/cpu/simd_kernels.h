// The hand-vectorised float32 CPU kernels, one table per instruction set
// (simd_vec.h), all from one source (simd_kernels_impl.h). kernel_set.h picks
// the table that runs; a CPU none fits runs the generic kernels (BLAS).
// Torch-free, like the kernels (see simd_vec.h).
//
// Why our own matrix product: the per-chunk products are small (a few hundred
// rows, widths up to a few hundred), where a BLAS call's fixed cost and its
// choice of code path matter, and MKL runs float32 products on AMD CPUs far
// below their vector rate. Why the narrow-layer kernels: at k = d = 16 each
// BLAS product is a 16-wide sliver of work and a chunked forward+backward
// makes six passes over it; these run the whole per-sample chain (x = W z,
// r = relu(x), q = Q r, f = rᵀ q and, in the backward, p = 2 g q ⊙ 1[r > 0],
// the dW = Σ p zᵀ and Gram Σ g r rᵀ sums) in one pass over a block of
// samples held in L1, one sample per vector lane.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace torchext {
namespace cpu {

// The narrow kernels take k <= kNarrowMaxK, d <= kNarrowMaxD (the workspace
// holds lane-wise dW partial sums: wider inputs go to BLAS, whose products are
// large enough to run well there).
constexpr int64_t kNarrowMaxK = 32;
constexpr int64_t kNarrowMaxD = 256;
constexpr int64_t kNarrowBlock = 128;  // samples per block

// Zero-padded copies of the weights the narrow kernels read: k rounded up to
// Kp, d to Dp, multiples of 8 (padded units have x = r = q = p = 0 and
// contribute nothing).
struct NarrowWeights {
  NarrowWeights(int64_t d_, int64_t k_, const float* W_, const float* Q_)
      : d(d_), k(k_), Kp(round8(k_)), Dp(round8(d_)), W(Kp * d, 0.f), WT(Dp * Kp, 0.f),
        Q(Kp * Kp, 0.f), Qupper(Kp * Kp, 0.f) {
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < d; ++j) {
        W[i * d + j] = W_[i * d + j];
        WT[j * Kp + i] = W_[i * d + j];
      }
    if (Q_ == nullptr) return;
    // rᵀ Q r = Σ_i r_i (Q_ii r_i + Σ_{j>i} (Q_ij + Q_ji) r_j). Where a pair's
    // sum overflows (Q's entries past FLT_MAX / 2), every entry is halved and
    // the sum doubled: halving is exact but for subnormals, which it would
    // round, so only then.
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = i + 1; j < k; ++j)
        halved = halved || (std::isinf(Q_[i * k + j] + Q_[j * k + i]) &&
                            std::isfinite(Q_[i * k + j]) && std::isfinite(Q_[j * k + i]));
    const float s = halved ? 0.5f : 1.f;
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < k; ++j) {
        Q[i * Kp + j] = Q_[i * k + j];
        Qupper[i * Kp + j] = j == i  ? s * Q_[i * k + i]
                             : j > i ? s * Q_[i * k + j] + s * Q_[j * k + i]
                                     : 0.f;
      }
  }
  static int64_t round8(int64_t v) { return (std::max<int64_t>(v, 1) + 7) / 8 * 8; }
  int64_t d, k, Kp, Dp;
  std::vector<float> W;       // Kp × d
  std::vector<float> WT;      // Dp × Kp
  std::vector<float> Q;       // Kp × Kp
  std::vector<float> Qupper;  // Kp × Kp: Q_ii on, Q_ij + Q_ji above the diagonal (or halves)
  bool halved = false;        // Qupper holds halves: f is twice its sum
};

// A narrow kernel's per-thread buffers: one block of samples transposed
// (feature-major: row c holds feature c of every sample), and the lane-wise
// partial sums of dW (Kp × Dp × lanes) and of the Gram (Kp × Kp × lanes).
// Zero-filled before first use; padding rows stay zero. 64-byte aligned.
struct NarrowBuffers {
  float *zT, *rT, *qT, *pT, *grT;  // Dp (zT) or Kp rows of kNarrowBlock
  float* g;                         // kNarrowBlock
  float *dW, *gram;                 // null in a forward
};

// How a product op(A) B is taken and stored.
struct GemmOptions {
  bool trans_a = false;     // op(A) = Aᵀ (A is K × M, row stride lda), else A (M × K)
  bool accumulate = false;  // add C's old value
  bool relu = false;        // store relu of the result (torch.relu: NaN stays NaN)
  bool upper = false;       // C square: only its elements on or above the diagonal are
                            // needed (those below may be left as they were, or written)
  bool trans_b = false;     // B is given transposed (N × K, row stride ldb), else K × N
};

struct SimdKernels {
  const char* name;
  int64_t lanes;  // floats per vector
  // Row-major C (M × N) = op(A) op(B) (see GemmOptions). Every element of C is
  // the same sum over K whatever M and N (blocks of 256 in order), so results
  // do not depend on how the work is split.
  void (*gemm)(const GemmOptions& o, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
               const float* B, int64_t ldb, float* C, int64_t ldc);
  // For n rows of k (q and r row-major, contiguous; p and gr rows ldo >= k
  // apart): p = 2 g_i q where not r <= 0, else 0 (torch's threshold_backward),
  // and gr = g_i r; either may be null.
  void (*relu_grads)(int64_t n, int64_t k, const float* g, const float* q, const float* r,
                     float* p, float* gr, int64_t ldo);
  // f for rows [0, n) of z (n × d); r and q (n × k) too when given.
  void (*narrow_forward)(const NarrowWeights& w, const float* z, int64_t n, float* f, float* r,
                         float* q, const NarrowBuffers& b);
  // Backward over rows [0, n): adds to b.dW (want_dW) and b.gram (want_gram),
  // writes dz (n × d) when given. r and q: the saved forward values or null.
  void (*narrow_backward)(const NarrowWeights& w, const float* z, const float* g, const float* r,
                          const float* q, int64_t n, bool want_dW, bool want_gram, float* dz,
                          const NarrowBuffers& b);
  // A register-only loop of `iters` × kFmaChains vector FMAs (its value is
  // returned so that it is not optimised away): the peak the kernels aim at.
  float (*fma_loop)(int64_t iters);
};
constexpr int64_t kFmaChains = 12;

// The tables compiled into this library (null: not in this build).
const SimdKernels* avx512_kernels();
const SimdKernels* avx2_kernels();
const SimdKernels* neon_kernels();

}  // namespace cpu
}  // namespace torchext
