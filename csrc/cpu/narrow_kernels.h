// Hand-vectorised CPU kernels of the quadratic plan for narrow layers
// (k <= kNarrowMaxK, d <= kNarrowMaxD), float32, on CPUs with AVX-512 (only
// after avx512_kernels_supported(), avx512.h).
//
// Why: at k = d = 16 each BLAS product is a 16-wide sliver of work; MKL runs
// such shapes at about half its peak, and a chunked forward+backward makes
// six passes over them. These kernels run the whole per-sample chain — x = W z,
// r = relu(x), q = Q r, f = rᵀ q and, in the backward, p = 2 g q ⊙ 1[r > 0],
// the dW = Σ p zᵀ and Gram Σ g r rᵀ accumulations — in one pass over a block
// of samples held in L1, sixteen samples per vector register (lanes are
// samples, so no horizontal reductions per sample).
#pragma once

#include "workspace.h"

#include <cstdint>
#include <vector>

namespace torchext {
namespace cpu {

constexpr int64_t kNarrowMaxK = 32;
// The workspace holds lane-wise dW partial sums (16 floats per weight): wider
// inputs go to BLAS, whose products are large enough to run well there.
constexpr int64_t kNarrowMaxD = 256;

// Zero-padded copies of the weights the kernels read: k rounded up to Kp, a
// multiple of 8 (padded units have x = r = q = p = 0 and contribute nothing).
struct NarrowWeights {
  NarrowWeights(int64_t d, int64_t k, const float* W, const float* Q);
  int64_t d, k, Kp, Dp;  // Dp: d rounded up to 8
  std::vector<float> W;   // Kp × d
  std::vector<float> WT;  // Dp × Kp
  std::vector<float> Q;   // Kp × Kp
  std::vector<float> Qupper;  // Kp × Kp: Q_ii on, Q_ij + Q_ji above the diagonal
};

// n floats of a workspace block.
struct FloatSpan {
  float* ptr = nullptr;
  int64_t n = 0;
  float* data() const { return ptr; }
  float* begin() const { return ptr; }
  float* end() const { return ptr + n; }
  float& operator[](int64_t i) const { return ptr[i]; }
};

// Per-thread buffers: one block of samples, transposed (feature-major), and
// the lane-wise partial sums of dW and of the Gram for one partition. The
// memory is the thread's (workspace.h), zero-filled here: padding rows stay
// zero for the workspace's life. One per thread at a time.
class NarrowWorkspace {
 public:
  // accumulate: room for the backward's dW and Gram partial sums.
  NarrowWorkspace(const NarrowWeights& w, bool accumulate);
  // Writes the partition's partial sums into gW (k×d) and the upper triangle
  // (with diagonal) of G (k×k), replacing what was there, then zeroes them
  // for the next partition.
  void flush(const NarrowWeights& w, float* gW, float* G);

  static constexpr int64_t kBlock = 128;  // samples per block
  FloatSpan zT, rT, qT, pT, grT, g, dW, gram;

 private:
  ThreadArena<struct NarrowWorkspaceTag> arena_;
};

// f for rows [0, n) of z (n × d, row-major). When r and q are given (n × k,
// row-major) they are written too, for the backward.
void narrow_forward(const NarrowWeights& w, const float* z, int64_t n, float* f,
                    float* r, float* q, NarrowWorkspace& ws);

// Backward over rows [0, n): accumulates dW (want_dW) and the Gram (want_gram)
// into the workspace and writes dz (n × d) when given. r and q are the saved
// forward values (n × k) or null (recomputed here).
void narrow_backward(const NarrowWeights& w, const float* z, const float* g,
                     const float* r, const float* q, int64_t n, bool want_dW,
                     bool want_gram, float* dz, NarrowWorkspace& ws);

}  // namespace cpu
}  // namespace torchext
