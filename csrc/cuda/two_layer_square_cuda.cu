// CUDA kernels. One warp owns one sample at a time: its lanes split the
// output features of each layer, the per-sample vectors live in shared memory
// (or, for very wide layers, in a global scratch slice of the warp), and the
// square-and-weight reduction is a fixed shuffle tree, so f is deterministic.
// The backward writes the per-sample vectors of a chunk of rows and folds them
// into the weight gradients with cuBLAS products, chunk after chunk in order:
// no floating-point atomics, bitwise reproducible.
#include "../two_layer_square.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

namespace torchext {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int64_t kMaxBlocks = 8192;
constexpr size_t kSharedLimit = 48 * 1024;  // no opt-in needed on any arch
// Elements of per-chunk buffers in the backward (64 MiB in float32).
constexpr int64_t kChunkScratchElems = int64_t{1} << 24;

// torch.relu semantics: NaN stays NaN.
template <typename T>
__device__ __forceinline__ T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

// sum_j row[j] * v[j]  (row of a row-major matrix times a vector)
template <typename T>
__device__ __forceinline__ T dot_row(const T* __restrict__ row,
                                     const T* __restrict__ v, int64_t n) {
  T acc = T(0);
  for (int64_t j = 0; j < n; ++j) acc += row[j] * v[j];
  return acc;
}

// sum_j M[j * ld + col] * v[j]  (column of a row-major matrix times a vector)
template <typename T>
__device__ __forceinline__ T dot_col(const T* __restrict__ M, int64_t ld,
                                     int64_t col, const T* __restrict__ v,
                                     int64_t n) {
  T acc = T(0);
  for (int64_t j = 0; j < n; ++j) acc += M[j * ld + col] * v[j];
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

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// f[n] = sum_q a[q] * (B V relu(W z_n))_q^2
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ z, const T* __restrict__ W,
                   const T* __restrict__ V, const T* __restrict__ B,
                   const T* __restrict__ a, T* __restrict__ f,
                   T* __restrict__ global_scratch, int64_t N, int64_t d,
                   int64_t k, int64_t m, int64_t ell) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
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

// Per-sample vectors of one chunk of rows, written to the chunk buffers
// (row n of each): r = relu(W z), u = V r, e = 2 g a*y, y2 = y*y,
// gu = B^T e, gx = (V^T gu) where not r <= 0, gz = W^T gx. A null pointer means
// "not requested"; the buffers double as the warp's working storage.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const T* __restrict__ z, const T* __restrict__ g,
                         const T* __restrict__ W, const T* __restrict__ V,
                         const T* __restrict__ B, const T* __restrict__ a,
                         int64_t rows, int64_t d, int64_t k, int64_t m,
                         int64_t ell, T* __restrict__ R, T* __restrict__ U,
                         T* __restrict__ E, T* __restrict__ Y2,
                         T* __restrict__ GU, T* __restrict__ GX,
                         T* __restrict__ GZ) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t n = int64_t(blockIdx.x) * kWarpsPerBlock + warp; n < rows; n += stride) {
    const T* zn = z + n * d;
    T* r = R + n * k;
    T* u = U + n * m;
    T* e = E + n * ell;
    for (int64_t j = lane; j < k; j += kWarp) r[j] = relu(dot_row(W + j * d, zn, d));
    __syncwarp();
    for (int64_t i = lane; i < m; i += kWarp) u[i] = dot_row(V + i * k, r, k);
    __syncwarp();
    const T gn = g[n];
    for (int64_t q = lane; q < ell; q += kWarp) {
      const T y = dot_row(B + q * m, u, m);
      e[q] = T(2) * (gn * a[q]) * y;
      if (Y2 != nullptr) Y2[n * ell + q] = y * y;
    }
    if (GU == nullptr) continue;
    __syncwarp();
    T* gu = GU + n * m;
    for (int64_t i = lane; i < m; i += kWarp) gu[i] = dot_col(B, m, i, e, ell);
    if (GX == nullptr) continue;
    __syncwarp();
    T* gx = GX + n * k;
    for (int64_t j = lane; j < k; j += kWarp) {
      const T gr = dot_col(V, k, j, gu, m);
      gx[j] = r[j] <= T(0) ? T(0) : gr;  // threshold_backward: a select; NaN passes
    }
    if (GZ == nullptr) continue;
    __syncwarp();
    for (int64_t s = lane; s < d; s += kWarp) GZ[n * d + s] = dot_col(W, d, s, gx, k);
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <typename T>
void launch_forward(const Dims& dims, const ComputeInputs& in, at::Tensor& f) {
  const int64_t per_warp = dims.k + dims.m;
  const size_t shared_bytes = size_t(kWarpsPerBlock) * per_warp * sizeof(T);
  const int64_t blocks = std::min(ceil_div(dims.N, kWarpsPerBlock), kMaxBlocks);
  at::Tensor scratch;  // only for layers too wide for shared memory
  if (shared_bytes > kSharedLimit) {
    scratch = at::empty({blocks * kWarpsPerBlock * per_warp}, in.z.options());
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  forward_kernel<T><<<blocks, kThreads, scratch.defined() ? 0 : shared_bytes, stream>>>(
      in.z.const_data_ptr<T>(), in.W.const_data_ptr<T>(),
      in.V.const_data_ptr<T>(), in.B.const_data_ptr<T>(),
      in.a.const_data_ptr<T>(), f.mutable_data_ptr<T>(), ptr_or_null<T>(scratch),
      dims.N, dims.d, dims.k, dims.m, dims.ell);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_backward(const Dims& dims, const ComputeInputs& in,
                     const at::Tensor& g, const OutputMask& mask,
                     GradBuffers& bufs) {
  const BatchPlan plan = make_batch_plan(dims, kChunkScratchElems, /*min_rows=*/1024, /*max_partitions=*/1);
  const int64_t C = std::min(plan.chunk_rows, dims.N);
  const auto opts = in.z.options();
  const bool need_gu = mask[kZ] || mask[kW] || mask[kV];
  const bool need_gx = mask[kZ] || mask[kW];
  at::Tensor R = at::empty({C, dims.k}, opts);
  at::Tensor U = at::empty({C, dims.m}, opts);
  at::Tensor E = at::empty({C, dims.ell}, opts);
  at::Tensor Y2 = mask[kA] ? at::empty({C, dims.ell}, opts) : at::Tensor();
  at::Tensor GU = need_gu ? at::empty({C, dims.m}, opts) : at::Tensor();
  at::Tensor GX = need_gx ? at::empty({C, dims.k}, opts) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();

  for (int64_t c = 0; c < plan.num_chunks; ++c) {
    const int64_t r0 = c * plan.chunk_rows;
    const int64_t n = std::min(plan.chunk_rows, dims.N - r0);
    const int64_t blocks = std::min(ceil_div(n, kWarpsPerBlock), kMaxBlocks);
    T* gz = mask[kZ] ? bufs.acc[kZ].mutable_data_ptr<T>() + r0 * dims.d : nullptr;
    backward_rows_kernel<T><<<blocks, kThreads, 0, stream>>>(
        in.z.const_data_ptr<T>() + r0 * dims.d, g.const_data_ptr<T>() + r0,
        in.W.const_data_ptr<T>(), in.V.const_data_ptr<T>(),
        in.B.const_data_ptr<T>(), in.a.const_data_ptr<T>(), n, dims.d, dims.k,
        dims.m, dims.ell, R.mutable_data_ptr<T>(), U.mutable_data_ptr<T>(),
        E.mutable_data_ptr<T>(), ptr_or_null<T>(Y2), ptr_or_null<T>(GU),
        ptr_or_null<T>(GX), gz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Weight gradients: sums over the chunk's rows, chunk after chunk.
    if (mask[kW]) bufs.acc[kW].addmm_(GX.narrow(0, 0, n).t(), in.z.narrow(0, r0, n));
    if (mask[kV]) bufs.acc[kV].addmm_(GU.narrow(0, 0, n).t(), R.narrow(0, 0, n));
    if (mask[kB]) bufs.acc[kB].addmm_(E.narrow(0, 0, n).t(), U.narrow(0, 0, n));
    if (mask[kA]) bufs.acc[kA].addmv_(Y2.narrow(0, 0, n).t(), g.narrow(0, r0, n));
  }
}

at::Tensor two_layer_square_cuda(const at::Tensor& z, const at::Tensor& W,
                                 const at::Tensor& V, const at::Tensor& B,
                                 const at::Tensor& A) {
  return run_forward(z, W, V, B, A, [&z](const Dims& dims, const ComputeInputs& in, at::Tensor& f) {
    const c10::cuda::CUDAGuard device_guard(z.device());
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_cuda", [&] {
      launch_forward<scalar_t>(dims, in, f);
    });
  });
}

BackwardResult two_layer_square_backward_cuda(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& W,
    const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
    std::array<bool, 5> output_mask) {
  return run_backward(grad, z, W, V, B, A, output_mask,
                      [&z](const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                           const OutputMask& mask, GradBuffers& bufs) {
    const c10::cuda::CUDAGuard device_guard(z.device());
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cuda", [&] {
      launch_backward<scalar_t>(dims, in, g, mask, bufs);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchext, CUDA, m) {
  m.impl("two_layer_square", &two_layer_square_cuda);
  m.impl("two_layer_square_backward", &two_layer_square_backward_cuda);
}

}  // namespace torchext
