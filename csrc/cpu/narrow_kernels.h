// The narrow-layer kernels of the quadratic plan (k <= kNarrowMaxK,
// d <= kNarrowMaxD, float32) where a SIMD kernel set runs: each thread's
// workspace, and the calls into the running set (simd_kernels.h says why
// these kernels exist and what they compute).
#pragma once

#include "simd_kernels.h"
#include "workspace.h"

#include <cstdint>

namespace torchext {
namespace cpu {

// Per-thread buffers (NarrowBuffers) for the running kernel set: the memory
// is the thread's (workspace.h), zero-filled here, so padding rows stay zero
// for the workspace's life. One per thread at a time.
class NarrowWorkspace {
 public:
  // accumulate: room for the backward's dW and Gram partial sums.
  NarrowWorkspace(const NarrowWeights& w, bool accumulate);
  // Writes the partition's partial sums into gW (k×d) and the upper triangle
  // (with diagonal) of G (k×k), replacing what was there, then zeroes them
  // for the next partition.
  void flush(const NarrowWeights& w, float* gW, float* G);

  const SimdKernels& kernels;
  NarrowBuffers buffers{};

 private:
  int64_t dW_elems_ = 0, gram_elems_ = 0;
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
