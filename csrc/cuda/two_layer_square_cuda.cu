// CUDA backend. The direct plan's inference forward is one fused kernel: a
// warp owns a sample at a time, its lanes split the output features of each
// layer, the per-sample vectors live in shared memory (or, for very wide
// layers, in a global scratch slice of the warp), and the square-and-weight
// reduction is a fixed shuffle tree, so f is deterministic. Everything else
// runs the device-generic ATen implementation (two_layer_square_aten.cpp) on
// cuBLAS, chunk after chunk in a fixed order: no floating-point atomics,
// bitwise reproducible.
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
// Per-chunk working set of the ATen path (64 MiB in float32), and enough rows
// for the weight-gradient products to be efficient.
constexpr int64_t kChunkScratchElems = int64_t{1} << 24;
constexpr int64_t kChunkMinRows = 1024;

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

void forward_kernel_cuda(const Dims& dims, const ComputeInputs& in, Plan plan,
                         ForwardOutputs& out) {
  const c10::cuda::CUDAGuard device_guard(in.z.device());
  if (plan == Plan::kDirect && out.r.size(0) == 0) {
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_cuda", [&] {
      launch_forward<scalar_t>(dims, in, out.f);
    });
    return;
  }
  const BatchPlan bp = make_batch_plan(dims, kChunkScratchElems, kChunkMinRows, 1);
  forward_aten(dims, in, plan, bp.chunk_rows, out);
}

void backward_kernel_cuda(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                          const at::Tensor& r, const at::Tensor& q, Plan plan,
                          const OutputMask& mask, GradBuffers& bufs) {
  const c10::cuda::CUDAGuard device_guard(in.z.device());
  const BatchPlan bp = make_batch_plan(dims, kChunkScratchElems, kChunkMinRows, 1);
  backward_aten(dims, in, g, r, q, plan, mask, bp.chunk_rows, bufs);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchext, CUDA, m) {
  register_kernels<&internal_forward<&forward_kernel_cuda>,
                   &internal_backward<&backward_kernel_cuda>>(m);
}

}  // namespace torchext
