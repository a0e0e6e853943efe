// CUDA backend.
//
// Quadratic plan (what the cost model picks for every batch worth a GPU):
// after the per-call products M = B V and Q = Mᵀ diag(a) M (cuBLAS, through
// ATen), the per-sample work is two fused kernels built on one tile product
// (tile_mma.cuh):
//   forward   a block owns 64 samples at a time (persistent grid): x = z Wᵀ
//             and r = relu(x) into shared memory, then q = r Qᵀ and
//             f = Σ r ⊙ q; r and q reach device memory only when saved.
//   backward  one launch, three kinds of blocks: partial dW = Σ p zᵀ and the
//             partial Gram Σ g r rᵀ (upper block triangle) over a fixed
//             partition of the batch, and dz = p W; p = 2 g q ⊙ 1[r > 0] is
//             formed while the operands are loaded. A second kernel sums the
//             partitions in order, then cuBLAS turns the Gram into dV, dB, dA.
// No floating-point atomics, partitions fixed by the shapes alone: bitwise
// reproducible. The direct plan's inference forward is one fused kernel too
// (a warp per sample), and so is its backward for small batches (one block
// walking the samples in order: direct_kernels.cuh). Every other case runs
// the device-generic ATen implementation (two_layer_square_aten.cpp) on
// cuBLAS, chunk after chunk in a fixed order. TORCHEXT_CUDA_KERNELS=aten
// turns the fused kernels off (comparisons, and an escape hatch); the
// direct forward's warp kernel stays.
#include "../two_layer_square.h"
#define TORCHEXT_TENSOR_CORE_TILES 1
#include "quadratic_kernels.cuh"
#include "direct_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

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

// ---------------------------------------------------------------------------
// Quadratic plan, fused (see the top of the file; kernels in quadratic_kernels.cuh).

using namespace quadratic;

// bfloat16/float16 inputs on sm_80 or newer: the products on tensor cores
// (operands staged in bfloat16, float32 accumulation; see tile_mma.cuh).
// float32 and float64 inputs keep full-precision SIMT products, whatever
// allow_tf32 says (cuBLAS's per-call products follow it).
bool use_tensor_cores(const ComputeInputs& in) {
  return (in.input_dtype == at::kBFloat16 || in.input_dtype == at::kHalf) &&
         at::cuda::getCurrentDeviceProperties()->major >= 8;
}

bool fused_kernels_enabled() {
  const char* v = std::getenv("TORCHEXT_CUDA_KERNELS");
  return v == nullptr || std::strcmp(v, "aten") != 0;
}

// Shared memory the fused forward needs beyond its static arrays: the tile's r.
template <typename T>
size_t forward_dynamic_shared(int64_t k) {
  return size_t(kTile) * size_t(k) * sizeof(T);
}

// How the fused forward launches for a width k on the current device:
// whether its shared memory fits at all, and how many blocks an SM holds.
// Decided once per (device, dtype, k) — the driver calls it takes (raising
// the dynamic shared-memory limit past 48 KiB, the occupancy query) stay out
// of later calls, and so out of CUDA graph captures after a warm-up.
struct ForwardLaunch {
  bool fits = false;
  int blocks_per_sm = 0;
};

template <typename T, bool kTensorCores>
ForwardLaunch forward_launch(int64_t k) {
  static std::mutex mutex;
  static std::map<std::pair<int, int64_t>, ForwardLaunch> decided;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = decided.find({device, k});
  if (it != decided.end()) return it->second;
  ForwardLaunch launch;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, quadratic_forward_kernel<T, kTensorCores>));
  const size_t dynamic = forward_dynamic_shared<T>(k);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (attr.sharedSizeBytes + dynamic <= prop->sharedMemPerBlockOptin) {
    if (dynamic > kSharedLimit) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(quadratic_forward_kernel<T, kTensorCores>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(dynamic)));
    }
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &launch.blocks_per_sm, quadratic_forward_kernel<T, kTensorCores>, cuda_tiles::kThreads, dynamic));
    launch.fits = launch.blocks_per_sm > 0;
  }
  decided[{device, k}] = launch;
  return launch;
}

// The fused forward, where its shared memory fits (else false: the caller
// runs the ATen path).
template <typename T, bool kTensorCores>
bool quadratic_forward_fused(const Dims& dims, const ComputeInputs& in, Plan plan,
                             ForwardOutputs& out) {
  const ForwardLaunch launch = forward_launch<T, kTensorCores>(dims.k);
  if (!launch.fits) return false;
  const at::Tensor Q = fold_head(in, plan).Q;
  const bool save = out.r.size(0) == dims.N;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::max<int64_t>(1, std::min(tiles_of(dims.N), sms * launch.blocks_per_sm));
  quadratic_forward_kernel<T, kTensorCores>
      <<<blocks, cuda_tiles::kThreads, forward_dynamic_shared<T>(dims.k), at::cuda::getCurrentCUDAStream()>>>(
          in.z.const_data_ptr<T>(), in.W.const_data_ptr<T>(), Q.const_data_ptr<T>(),
          out.f.mutable_data_ptr<T>(), save ? out.r.mutable_data_ptr<T>() : nullptr,
          save ? out.q.mutable_data_ptr<T>() : nullptr, dims.N, dims.d, dims.k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The batch partition of the fused backward: by the shapes alone (never the
// device), so the sums, and the results, are the same on every card.
constexpr int64_t kMinRowsPerPartition = 512;
constexpr int64_t kMaxCudaPartitions = 64;
constexpr int64_t kPartialElemsBudget = int64_t{1} << 25;

int64_t fused_partitions(const Dims& dims) {
  int64_t parts = std::min(kMaxCudaPartitions, std::max<int64_t>(1, dims.N / kMinRowsPerPartition));
  const int64_t per_part = dims.k * std::max(dims.d, dims.k);
  parts = std::min(parts, std::max<int64_t>(1, kPartialElemsBudget / std::max<int64_t>(1, per_part)));
  return parts;
}

void launch_sums(const at::Tensor& parts, int64_t partitions, int64_t rows, int64_t cols,
                 bool mirror_upper, at::Tensor& out) {
  const int64_t elems = rows * cols;
  if (elems == 0) return;
  const int64_t blocks = std::min<int64_t>(ceil_div(elems, 256), 4096);
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "torchext_sum_partitions", [&] {
    sum_partitions_kernel<scalar_t><<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        parts.const_data_ptr<scalar_t>(), partitions, rows, cols, mirror_upper,
        out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dz, dW and the Gram from the saved r and q; dV, dB, dA from the Gram.
template <typename T, bool kTensorCores>
void quadratic_backward_fused(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                              const at::Tensor& r, const at::Tensor& q, const OutputMask& mask,
                              GradBuffers& bufs) {
  const bool want_gram = mask[kV] || mask[kB] || mask[kA];
  const int64_t parts = fused_partitions(dims);
  QuadraticBackwardArgs<T> a{};
  a.z = in.z.const_data_ptr<T>();
  a.W = in.W.const_data_ptr<T>();
  a.g = g.const_data_ptr<T>();
  a.g_stride = grad_stride(g);
  a.r = r.const_data_ptr<T>();
  a.q = q.const_data_ptr<T>();
  a.N = dims.N, a.d = dims.d, a.k = dims.k;
  a.rows_per_partition = ceil_div(dims.N, parts);
  // float32 SIMT with wide layers: 128 × 128 tiles for dW and the Gram (see
  // tile_mma.cuh); narrower layers would leave most of such a tile empty.
  constexpr bool kMayWiden = std::is_same_v<T, float> && !kTensorCores;
  const bool wide = kMayWiden && dims.k >= 128 && dims.d >= 128;
  const int64_t tile = wide ? cuda_tiles::Tile128::kTile : kTile;
  at::Tensor dW_parts, gram_parts, gram;
  if (mask[kW] && dims.k > 0 && dims.d > 0) {
    dW_parts = at::empty({parts, dims.k, dims.d}, in.z.options());
    a.dW_parts = dW_parts.mutable_data_ptr<T>();
    a.dW_blocks = parts * tiles_of(dims.k, tile) * tiles_of(dims.d, tile);
  }
  if (want_gram) {  // (k = 0 too: dB and dA are then zeros, written below)
    gram_parts = at::empty({parts, dims.k, dims.k}, in.z.options());
    gram = at::empty({dims.k, dims.k}, in.z.options());
    a.gram_parts = gram_parts.mutable_data_ptr<T>();
    a.gram_blocks = parts * tiles_of(dims.k, tile) * (tiles_of(dims.k, tile) + 1) / 2;
  }
  if (mask[kZ] && dims.d > 0) {
    a.dz = bufs.acc[kZ].mutable_data_ptr<T>();
    a.dz_blocks = tiles_of(dims.N) * tiles_of(dims.d);
  }
  const int64_t blocks = a.dW_blocks + a.gram_blocks + a.dz_blocks;
  if (blocks > 0) {
    auto stream = at::cuda::getCurrentCUDAStream();
    if (wide) {
      quadratic_backward_kernel<T, kTensorCores, kMayWiden><<<blocks, cuda_tiles::kThreads, 0, stream>>>(a);
    } else {
      quadratic_backward_kernel<T, kTensorCores, false><<<blocks, cuda_tiles::kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (dW_parts.defined()) launch_sums(dW_parts, parts, dims.k, dims.d, false, bufs.acc[kW]);
  if (gram.defined()) {
    launch_sums(gram_parts, parts, dims.k, dims.k, true, gram);
    add_grads_from_gram(in, fold_head(in, Plan::kFolded).M, gram, mask, bufs);
  }
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
  if (plan == Plan::kQuadratic && fused_kernels_enabled()) {
    bool done = false;
    if (use_tensor_cores(in)) {
      done = quadratic_forward_fused<float, true>(dims, in, plan, out);
    } else {
      AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_cuda_quadratic", [&] {
        done = quadratic_forward_fused<scalar_t, false>(dims, in, plan, out);
      });
    }
    if (done) return;
  }
  const BatchPlan bp = make_batch_plan(dims, kChunkScratchElems, kChunkMinRows, 1);
  forward_aten(dims, in, plan, bp.chunk_rows, out);
}

// The direct plan's single-kernel backward (direct_kernels.cuh) takes batches
// this small, whose work is too little to fill more than one multiprocessor.
constexpr int64_t kSmallBatchMax = 64;
constexpr double kSmallBatchMaxWork = double(1 << 22);

bool small_direct_backward_applies(const Dims& dims, size_t elem_size) {
  const double work = double(dims.N) * double(dims.k * dims.d + dims.m * dims.k + dims.ell * dims.m);
  const size_t shared = size_t(direct::small_backward_shared_elems(dims.k, dims.m, dims.ell)) * elem_size;
  return fused_kernels_enabled() && dims.N <= kSmallBatchMax && work <= kSmallBatchMaxWork &&
         shared <= kSharedLimit;
}

template <typename T>
void small_direct_backward(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                           const OutputMask& mask, GradBuffers& bufs) {
  auto out = [&](int i) { return mask[i] ? bufs.acc[i].mutable_data_ptr<T>() : nullptr; };
  direct::SmallBackwardArgs<T> a{};
  a.z = in.z.const_data_ptr<T>();
  a.W = in.W.const_data_ptr<T>();
  a.V = in.V.const_data_ptr<T>();
  a.B = in.B.const_data_ptr<T>();
  a.a = in.a.const_data_ptr<T>();
  a.g = g.const_data_ptr<T>();
  a.g_stride = grad_stride(g);
  a.dz = out(kZ), a.dW = out(kW), a.dV = out(kV), a.dB = out(kB), a.dA = out(kA);
  a.N = dims.N, a.d = dims.d, a.k = dims.k, a.m = dims.m, a.ell = dims.ell;
  const size_t shared = size_t(direct::small_backward_shared_elems(dims.k, dims.m, dims.ell)) * sizeof(T);
  direct::small_backward_kernel<T>
      <<<1, direct::kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void backward_kernel_cuda(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                          const at::Tensor& r, const at::Tensor& q, Plan plan,
                          const OutputMask& mask, GradBuffers& bufs) {
  const c10::cuda::CUDAGuard device_guard(in.z.device());
  if (plan == Plan::kDirect && small_direct_backward_applies(dims, in.z.element_size())) {
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cuda_small", [&] {
      small_direct_backward<scalar_t>(dims, in, g, mask, bufs);
    });
    return;
  }
  if (plan == Plan::kQuadratic && r.defined() && fused_kernels_enabled()) {
    if (use_tensor_cores(in)) {
      quadratic_backward_fused<float, true>(dims, in, g, r, q, mask, bufs);
    } else {
      AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cuda", [&] {
        quadratic_backward_fused<scalar_t, false>(dims, in, g, r, q, mask, bufs);
      });
    }
    return;
  }
  const BatchPlan bp = make_batch_plan(dims, kChunkScratchElems, kChunkMinRows, 1);
  backward_aten(dims, in, g, r, q, plan, mask, bp.chunk_rows, bufs);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchext, CUDA, m) {
  register_kernels<&forward_kernel_cuda, &backward_kernel_cuda>(m);
}

}  // namespace torchext
