// The elementwise steps of the per-chunk algebra: ReLU and its derivative,
// a column scaling, and the rows' dot products.
#pragma once

#include "kernel_set.h"
#include "portability.h"

#include <cstdint>
#include <type_traits>

namespace torchext {
namespace cpu {

// Elementwise loops over whole chunks, on restrict pointers and without
// branches so that they vectorise (a data-dependent branch per element costs
// more than the BLAS products at narrow widths).

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
// units, and a NaN unit (r NaN) passes its gradient through; and gr = g_i r_ij
// (the Gram's left operand). Either output may be null. q and r are rows of
// k; p and gr rows ldo apart (see ChunkScratch::ldp). One pass, on the SIMD
// kernels where they run.
template <typename T>
void relu_grads(int64_t n, int64_t k, const T* __restrict__ g, const T* __restrict__ q,
                const T* __restrict__ r, T* __restrict__ p, T* __restrict__ gr, int64_t ldo) {
  if constexpr (std::is_same_v<T, float>) {
    if (const SimdKernels* simd = float32_simd_kernels()) {
      simd->relu_grads(n, k, g, q, r, p, gr, ldo);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    if (p != nullptr)
      for (int64_t j = 0; j < k; ++j) {
        const T v = g[i] * q[i * k + j];  // 2 g q as v + v (see relu_grad_of)
        p[i * ldo + j] = r[i * k + j] <= T(0) ? T(0) : v + v;
      }
    if (gr != nullptr)
      for (int64_t j = 0; j < k; ++j) gr[i * ldo + j] = g[i] * r[i * k + j];
  }
}

// p = p where not r <= 0, else 0 (threshold_backward on a ready gradient):
// n rows of k, r's contiguous, p's ldp apart.
template <typename T>
void relu_grad_inplace(int64_t n, int64_t k, const T* __restrict__ r, T* __restrict__ p,
                       int64_t ldp) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) p[i * ldp + j] = r[i * k + j] <= T(0) ? T(0) : p[i * ldp + j];
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

}  // namespace cpu
}  // namespace torchext
