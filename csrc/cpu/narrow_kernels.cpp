#include "narrow_kernels.h"

#include "kernel_set.h"

#include <algorithm>

namespace torchext {
namespace cpu {

NarrowWorkspace::NarrowWorkspace(const NarrowWeights& w, bool accumulate)
    : kernels(*float32_simd_kernels()) {
  const int64_t S = kNarrowBlock, lanes = kernels.lanes;
  dW_elems_ = accumulate ? w.Kp * w.Dp * lanes : 0;
  gram_elems_ = accumulate ? w.Kp * w.Kp * lanes : 0;
  float** spans[] = {&buffers.zT, &buffers.rT, &buffers.qT, &buffers.pT, &buffers.grT, &buffers.g,
                     &buffers.dW, &buffers.gram};
  const int64_t sizes[] = {w.Dp * S, w.Kp * S, w.Kp * S, w.Kp * S, w.Kp * S, S, dW_elems_, gram_elems_};
  int64_t total = 0;
  for (int64_t n : sizes) total += padded_elems(n);
  float* next = aligned_block<float>(arena_, total);
  std::fill(next, next + total, 0.f);
  for (int i = 0; i < 8; ++i) {
    *spans[i] = sizes[i] > 0 ? next : nullptr;
    next += padded_elems(sizes[i]);
  }
}

void NarrowWorkspace::flush(const NarrowWeights& w, float* gW, float* G) {
  const int64_t lanes = kernels.lanes;
  auto lane_sum = [lanes](const float* v) {
    float s = 0.f;
    for (int64_t l = 0; l < lanes; ++l) s += v[l];
    return s;
  };
  if (gW != nullptr)
    for (int64_t i = 0; i < w.k; ++i)
      for (int64_t j = 0; j < w.d; ++j) gW[i * w.d + j] = lane_sum(&buffers.dW[(i * w.Dp + j) * lanes]);
  if (G != nullptr)
    for (int64_t i = 0; i < w.k; ++i)
      for (int64_t j = i; j < w.k; ++j) G[i * w.k + j] = lane_sum(&buffers.gram[(i * w.Kp + j) * lanes]);
  if (buffers.dW != nullptr) std::fill(buffers.dW, buffers.dW + dW_elems_, 0.f);
  if (buffers.gram != nullptr) std::fill(buffers.gram, buffers.gram + gram_elems_, 0.f);
}

void narrow_forward(const NarrowWeights& w, const float* z, int64_t n, float* f, float* r,
                    float* q, NarrowWorkspace& ws) {
  ws.kernels.narrow_forward(w, z, n, f, r, q, ws.buffers);
}

void narrow_backward(const NarrowWeights& w, const float* z, const float* g, const float* r,
                     const float* q, int64_t n, bool want_dW, bool want_gram, float* dz,
                     NarrowWorkspace& ws) {
  ws.kernels.narrow_backward(w, z, g, r, q, n, want_dW, want_gram, dz, ws.buffers);
}

}  // namespace cpu
}  // namespace torchext
