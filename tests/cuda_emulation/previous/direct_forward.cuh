// The direct plan's warp forward as csrc/cuda/two_layer_square_cuda.cu had it
// at commit 634f880 (its lines 46-48 and 56-119, verbatim), before it moved to
// direct_kernels.cuh: the emulation checks the moved kernel against it bitwise.
#pragma once

#include <cstdint>

#include "quadratic_kernels.cuh"  // relu, TORCHEXT_DYNAMIC_SHARED

namespace torchext {
namespace previous_direct {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;

// sum_j row[j] * v[j]  (row of a row-major matrix times a vector)
template <typename T>
__device__ __forceinline__ T dot_row(const T* __restrict__ row,
                                     const T* __restrict__ v, int64_t n) {
  T acc = T(0);
  for (int64_t j = 0; j < n; ++j) acc += row[j] * v[j];
  return acc;
}

// Sum over the warp's lanes in a fixed tree; the result is in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}


// f[n] = sum_q a[q] * (B V relu(W z_n))_q^2
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ z, const T* __restrict__ W,
                   const T* __restrict__ V, const T* __restrict__ B,
                   const T* __restrict__ a, T* __restrict__ f,
                   T* __restrict__ global_scratch, int64_t N, int64_t d,
                   int64_t k, int64_t m, int64_t ell) {
  TORCHEXT_DYNAMIC_SHARED(shared_raw);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t per_warp = k + m;
  T* block_buf = global_scratch != nullptr
                     ? global_scratch + int64_t(blockIdx.x) * kWarpsPerBlock * per_warp
                     : reinterpret_cast<T*>(shared_raw);
  T* r = block_buf + warp * per_warp;  // k entries
  T* u = r + k;                        // m entries
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + warp; n < N; n += stride) {
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


}  // namespace previous_direct
}  // namespace torchext
