// The direct plan's backward for small batches (the seed's case, z a single
// vector, and a few samples more) as one kernel: at these sizes the cost of a
// call is the number of launches, and the device-generic chain launches about
// fifteen. One block walks the samples in order and runs the chain of each in
// shared memory, in eager's association order:
//   x = W z, r = relu(x), u = V r, y = B u, e = 2 g a ⊙ y,
//   gu = Bᵀ e, p = (Vᵀ gu) ⊙ 1[r > 0], dz = Wᵀ p,
// adding into the weight gradients dA += g y², dB += e uᵀ, dV += gu rᵀ,
// dW += p zᵀ, each element owned by one thread: sums in sample order, bitwise
// reproducible. Like quadratic_kernels.cuh, plain enough to be compiled as
// host C++ by tests/cuda_emulation.
#pragma once

#include <cstdint>

#include "quadratic_kernels.cuh"  // relu, ceil_div, TORCHEXT_DYNAMIC_SHARED

namespace torchext {
namespace direct {

constexpr int kThreads = 256;

// The gradients to write (null where not requested, and then not computed
// where nothing else needs them); the first sample writes them, later ones add.
template <typename T>
struct SmallBackwardArgs {
  const T *z, *W, *V, *B, *a, *g;
  int64_t g_stride;  // 1, or 0 for a broadcast gradient
  T *dz, *dW, *dV, *dB, *dA;
  int64_t N, d, k, m, ell;
};

// Shared memory the kernel needs, in elements of T.
inline int64_t small_backward_shared_elems(int64_t k, int64_t m, int64_t ell) {
  return 2 * k + 2 * m + ell;  // r, p | u, gu | y (then e)
}

// out[i] = Σ_j M[i * row_stride + j * col_stride] v[j] for i < rows, threads
// striding over i: M v for a row-major M (row_stride = ld, col_stride = 1),
// Mᵀ v for (1, ld).
template <typename T>
__device__ __forceinline__ void mat_vec(const T* __restrict__ M, int64_t row_stride,
                                        int64_t col_stride, int64_t rows, int64_t cols,
                                        const T* __restrict__ v, T* __restrict__ out) {
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    T acc = T(0);
    for (int64_t j = 0; j < cols; ++j) acc += M[i * row_stride + j * col_stride] * v[j];
    out[i] = acc;
  }
}

// G[i * cols + j] (= if first, else +=) x[i] y[j], each element by one thread.
template <typename T>
__device__ __forceinline__ void add_outer(T* __restrict__ G, int64_t rows, int64_t cols,
                                          const T* __restrict__ x, const T* __restrict__ y,
                                          bool first) {
  for (int64_t e = threadIdx.x; e < rows * cols; e += blockDim.x)
    G[e] = (first ? T(0) : G[e]) + x[e / cols] * y[e % cols];
}

template <typename T>
__global__ void __launch_bounds__(kThreads) small_backward_kernel(const SmallBackwardArgs<T> a) {
  TORCHEXT_DYNAMIC_SHARED(shared_raw);
  T* r = reinterpret_cast<T*>(shared_raw);
  T* p = r + a.k;
  T* u = p + a.k;
  T* gu = u + a.m;
  T* y = gu + a.m;
  const bool need_gu = a.dV != nullptr || a.dW != nullptr || a.dz != nullptr;
  const bool need_p = a.dW != nullptr || a.dz != nullptr;
  for (int64_t n = 0; n < a.N; ++n) {
    const T* zn = a.z + n * a.d;
    const T gn = a.g[n * a.g_stride];
    mat_vec(a.W, a.d, 1, a.k, a.d, zn, r);  // x = W z
    __syncthreads();
    for (int64_t i = threadIdx.x; i < a.k; i += blockDim.x) r[i] = relu(r[i]);
    __syncthreads();
    mat_vec(a.V, a.k, 1, a.m, a.k, r, u);  // u = V r
    __syncthreads();
    mat_vec(a.B, a.m, 1, a.ell, a.m, u, y);  // y = B u
    __syncthreads();
    for (int64_t i = threadIdx.x; i < a.ell; i += blockDim.x) {
      const T yi = y[i];
      if (a.dA != nullptr) a.dA[i] = (n == 0 ? T(0) : a.dA[i]) + gn * (yi * yi);
      y[i] = T(2) * (gn * a.a[i]) * yi;  // y becomes e
    }
    __syncthreads();
    if (a.dB != nullptr) add_outer(a.dB, a.ell, a.m, y, u, n == 0);
    if (need_gu) mat_vec(a.B, 1, a.m, a.m, a.ell, y, gu);  // gu = Bᵀ e
    __syncthreads();
    if (a.dV != nullptr) add_outer(a.dV, a.m, a.k, gu, r, n == 0);
    if (need_p) {
      mat_vec(a.V, 1, a.k, a.k, a.m, gu, p);  // Vᵀ gu
      __syncthreads();
      for (int64_t i = threadIdx.x; i < a.k; i += blockDim.x) p[i] = r[i] <= T(0) ? T(0) : p[i];
      __syncthreads();
      if (a.dW != nullptr) add_outer(a.dW, a.k, a.d, p, zn, n == 0);
      if (a.dz != nullptr) mat_vec(a.W, 1, a.d, a.d, a.k, p, a.dz + n * a.d);  // Wᵀ p
    }
    __syncthreads();  // r, p, u, gu, y are rewritten by the next sample
  }
}

}  // namespace direct
}  // namespace torchext
