// The direct plan's fused kernels.
//
// The inference forward: a warp per sample, x = W z, r = relu(x) and u = V r
// in the warp's share of shared memory (of global scratch where that is too
// small), then y = B u and f = Σ a ⊙ y² summed over the lanes in a fixed tree.
//
// The backward for small batches (the seed's case, z a single
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

// sum_j row[j] * v[j]  (row of a row-major matrix times a vector)
template <typename T>
__device__ __forceinline__ T dot_row(const T* __restrict__ row, const T* __restrict__ v,
                                     int64_t n) {
  T acc = T(0);
  for (int64_t j = 0; j < n; ++j) acc += row[j] * v[j];
  return acc;
}

constexpr int kWarp = 32;
constexpr int kForwardWarps = launch::kDirectForwardWarps;
constexpr int kForwardThreads = kWarp * kForwardWarps;

// Sum over the warp's lanes in a fixed tree; the result is in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// f[n] = sum_q a[q] * (B V relu(W z_n))_q^2. Each warp needs k + m elements:
// the block's from dynamic shared memory, or (global_scratch not null) from
// the block's share of global_scratch, kForwardWarps · (k + m) per block.
template <typename T>
__global__ void __launch_bounds__(kForwardThreads)
    warp_forward_kernel(const T* __restrict__ z, const T* __restrict__ W,
                        const T* __restrict__ V, const T* __restrict__ B,
                        const T* __restrict__ a, T* __restrict__ f,
                        T* __restrict__ global_scratch, int64_t N, int64_t d, int64_t k,
                        int64_t m, int64_t ell) {
  TORCHEXT_DYNAMIC_SHARED(shared_raw);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t per_warp = k + m;
  T* block_buf = global_scratch != nullptr
                     ? global_scratch + int64_t(blockIdx.x) * kForwardWarps * per_warp
                     : reinterpret_cast<T*>(shared_raw);
  T* r = block_buf + warp * per_warp;  // k entries
  T* u = r + k;                        // m entries
  const int64_t stride = int64_t(gridDim.x) * kForwardWarps;
  for (int64_t n = int64_t(blockIdx.x) * kForwardWarps + warp; n < N; n += stride) {
    const T* zn = z + n * d;
    for (int64_t j = lane; j < k; j += kWarp) r[j] = relu(dot_row(W + j * d, zn, d));
    __syncwarp();
    for (int64_t i = lane; i < m; i += kWarp) u[i] = dot_row(V + i * k, r, k);
    __syncwarp();
    T part = T(0);
    for (int64_t q = lane; q < ell; q += kWarp) {
      const T y = dot_row(B + q * m, u, m);
      part += a[q] * (y * y);
    }
    part = warp_sum(part);
    if (lane == 0) f[n] = part;
    __syncwarp();  // r and u are overwritten by the warp's next sample
  }
}

constexpr int kThreads = 256;  // the small-batch backward's block

// The gradients to write (null where not requested, and then not computed
// where nothing else needs them); the first sample writes them, later ones add.
template <typename T>
struct SmallBackwardArgs {
  const T *z, *W, *V, *B, *a, *g;
  int64_t g_stride;  // 1, or 0 for a broadcast gradient
  T *dz, *dW, *dV, *dB, *dA;
  int64_t N, d, k, m, ell;
};

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

// Shared memory: launch::small_backward_dynamic_smem.
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
      const T t = (gn * a.a[i]) * yi;  // y becomes e = t + t (2 (g a) overflows first)
      y[i] = t + t;
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
