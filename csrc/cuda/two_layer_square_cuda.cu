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
// turns the fused kernels off (comparisons, and an escape hatch; read once);
// the direct forward's warp kernel stays. Every launch decision (shared
// memory, opt-in, tensor cores or not, partitions, grids) is made in
// launch_plan.h, on numbers read from the device and the kernels here.
#include "../aten/two_layer_square_aten.h"
#include "../head.h"
#include "../kernel_frames.h"
#include "cuda_switches.h"
#define TORCHEXT_TENSOR_CORE_TILES 1
#include "launch_plan.h"
#include "quadratic_kernels.cuh"
#include "direct_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

namespace torchext {
namespace {

// Per-chunk working set of the ATen path (64 MiB in float32), and enough rows
// for the weight-gradient products to be efficient.
constexpr int64_t kChunkScratchElems = int64_t{1} << 24;
constexpr int64_t kChunkMinRows = 1024;

// --- the device, the kernels on it, the grid ----------------------------------

launch::DeviceLimits device_limits() {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return {int64_t(prop->sharedMemPerBlock), int64_t(prop->sharedMemPerBlockOptin),
          int64_t(prop->sharedMemPerMultiprocessor), int64_t(prop->multiProcessorCount),
          prop->major * 10 + prop->minor};
}

// Kernel's attributes on the current device, read once per device; on the
// first read its dynamic shared-memory limit is raised to all the device
// allows (launch::dynamic_smem_attribute: never per launch, never lowered).
template <auto Kernel>
launch::KernelAttributes kernel_on_device() {
  static std::mutex mutex;
  static std::map<int, launch::KernelAttributes> known;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  // A first call inside a CUDA graph capture (no warm-up, a new device)
  // makes these driver calls during the capture; relaxed mode, as torch
  // uses for its own lazy set-up, keeps a global-mode capture from refusing
  // any of them. (Defensive: not seen to fail, no GPU test of it yet.)
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
  const launch::KernelAttributes kernel{int64_t(attr.sharedSizeBytes), attr.ptxVersion};
  const int64_t attribute = launch::dynamic_smem_attribute(device_limits(), kernel);
  if (attribute > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(attribute)));
  }
  known.emplace(device, kernel);
  return kernel;
}

// Resident blocks per SM of Kernel with `dynamic` bytes, asked once per
// (device, dynamic): the driver calls stay out of later calls, and so out of
// CUDA graph captures after a warm-up.
template <auto Kernel>
int64_t blocks_per_sm(int threads, int64_t dynamic) {
  kernel_on_device<Kernel>();  // the attribute, before the query that depends on it
  static std::mutex mutex;
  static std::map<std::pair<int, int64_t>, int64_t> known;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find({device, dynamic});
  if (it != known.end()) return it->second;
  const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);  // (as above)
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, threads,
                                                               size_t(dynamic)));
  known.emplace(std::make_pair(device, dynamic), int64_t(blocks));
  return blocks;
}

dim3 checked_grid(int64_t blocks, const char* kernel) {
  TORCH_CHECK(launch::grid_fits(blocks), "torchext CUDA kernel ", kernel, ": a grid of ", blocks,
              " blocks is outside CUDA's limit of 1 to ", launch::kMaxGridX,
              " blocks (2^31 - 1); the batch is too large for this kernel");
  return dim3(unsigned(blocks));
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// The direct plan's inference forward (direct_kernels.cuh): a grid of one
// wave, its warps striding over the samples, and global scratch (where
// shared memory is too small) for that grid's warps only.
template <typename T>
void launch_forward(const Dims& dims, const ComputeInputs& in, at::Tensor& f) {
  constexpr auto kernel = &direct::warp_forward_kernel<T>;
  const launch::DeviceLimits dev = device_limits();
  const launch::DirectForwardShared shared =
      launch::direct_forward_shared(dev, kernel_on_device<kernel>(), dims.k, dims.m, sizeof(T));
  const int64_t per_sm = blocks_per_sm<kernel>(direct::kForwardThreads, shared.dynamic_smem);
  const int64_t blocks = launch::direct_forward_grid(dev, dims.N, per_sm);
  const dim3 grid = checked_grid(blocks, "direct forward");
  at::Tensor scratch;
  if (shared.scratch) {
    scratch = uninitialized({launch::direct_forward_scratch_elems(blocks, dims.k, dims.m)},
                            in.z.options());
  }
  kernel<<<grid, direct::kForwardThreads, shared.dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(
      in.z.const_data_ptr<T>(), in.W.const_data_ptr<T>(), in.V.const_data_ptr<T>(),
      in.B.const_data_ptr<T>(), in.a.const_data_ptr<T>(), f.mutable_data_ptr<T>(),
      ptr_or_null<T>(scratch), dims.N, dims.d, dims.k, dims.m, dims.ell);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// Quadratic plan, fused (see the top of the file; kernels in quadratic_kernels.cuh).

using namespace quadratic;

// bfloat16 inputs on sm_80 or newer, from a build that has tensor-core code
// for the device (launch::use_tensor_core_tiles; every kernel of this file is
// built for the same architectures, so the forward's tells for all): the
// products on tensor cores (operands staged in bfloat16, float32
// accumulation; see tile_mma.cuh). float16 inputs take the float32 SIMT
// kernels: staged in bfloat16 they would lose 3 bits of every input, which
// dz's cancellations carry past the README's 1e-2 bound (seen on an H200:
// benchmarks/gpu-notes.md), and staged in float16 Q = Mᵀ diag(a) M could
// overflow. float32 and float64 inputs keep full-precision SIMT products,
// whatever allow_tf32 says (cuBLAS's per-call products follow it).
bool use_tensor_cores(const ComputeInputs& in) {
  return launch::use_tensor_core_tiles(in.input_dtype == at::kBFloat16, device_limits(),
                                       kernel_on_device<&quadratic_forward_kernel<float, true>>());
}

// TORCHEXT_CUDA_KERNELS, read once (not on every call); the test hook below
// reads it again.
bool read_fused_switch() {
  const char* v = std::getenv("TORCHEXT_CUDA_KERNELS");
  return v == nullptr || std::strcmp(v, "aten") != 0;
}

std::atomic<bool>& fused_switch() {
  static std::atomic<bool> enabled{read_fused_switch()};
  return enabled;
}

bool fused_kernels_enabled() { return fused_switch().load(std::memory_order_relaxed); }


// The fused forward, where its shared memory fits (else false: the caller
// runs the ATen path).
template <typename T, bool kTensorCores>
bool quadratic_forward_fused(const Dims& dims, const ComputeInputs& in, Plan plan,
                             ForwardOutputs& out) {
  constexpr auto kernel = &quadratic_forward_kernel<T, kTensorCores>;
  const launch::DeviceLimits dev = device_limits();
  const launch::ForwardShared shared =
      launch::quadratic_forward_shared(dev, kernel_on_device<kernel>(), dims.k, sizeof(T));
  if (!shared.fits) return false;
  const int64_t per_sm = blocks_per_sm<kernel>(cuda_tiles::kThreads, shared.dynamic_smem);
  if (per_sm == 0) return false;
  const dim3 grid = checked_grid(launch::quadratic_forward_grid(dev, dims.N, per_sm),
                                 "quadratic forward");
  const at::Tensor Q = fold_head(in, plan).Q;
  const bool save = out.r.size(0) == dims.N;
  kernel<<<grid, cuda_tiles::kThreads, shared.dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(
      in.z.const_data_ptr<T>(), in.W.const_data_ptr<T>(), Q.const_data_ptr<T>(),
      out.f.mutable_data_ptr<T>(), save ? out.r.mutable_data_ptr<T>() : nullptr,
      save ? out.q.mutable_data_ptr<T>() : nullptr, dims.N, dims.d, dims.k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

void launch_sums(const at::Tensor& parts, int64_t partitions, int64_t rows, int64_t cols,
                 bool mirror_upper, at::Tensor& out) {
  const int64_t elems = rows * cols;
  if (elems == 0) return;
  const dim3 grid = checked_grid(launch::sum_partitions_grid(elems), "sum of partitions");
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "torchext_sum_partitions", [&] {
    sum_partitions_kernel<scalar_t>
        <<<grid, launch::kSumThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
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
  constexpr bool kMayWiden = std::is_same_v<T, float> && !kTensorCores;
  const bool wide = launch::backward_wide_tiles(kMayWiden, dims.d, dims.k);
  const bool want_gram = mask[kV] || mask[kB] || mask[kA];
  const launch::BackwardBlocks plan = launch::quadratic_backward_blocks(
      dims.N, dims.d, dims.k, launch::backward_partitions(dims.N, dims.d, dims.k), wide, mask[kW],
      want_gram, mask[kZ]);
  QuadraticBackwardArgs<T> a{};
  a.z = in.z.const_data_ptr<T>();
  a.W = in.W.const_data_ptr<T>();
  a.g = g.const_data_ptr<T>();
  a.g_stride = grad_stride(g);
  a.r = r.const_data_ptr<T>();
  a.q = q.const_data_ptr<T>();
  a.N = dims.N, a.d = dims.d, a.k = dims.k;
  a.rows_per_partition = plan.rows_per_partition;
  a.dW_blocks = plan.dW, a.gram_blocks = plan.gram, a.dz_blocks = plan.dz;
  at::Tensor dW_parts, gram_parts, gram;
  if (plan.dW > 0) {
    dW_parts = uninitialized({plan.partitions, dims.k, dims.d}, in.z.options());
    a.dW_parts = dW_parts.mutable_data_ptr<T>();
  }
  if (want_gram) {  // (k = 0 too: dB and dA are then zeros, written below)
    gram_parts = uninitialized({plan.partitions, dims.k, dims.k}, in.z.options());
    gram = uninitialized({dims.k, dims.k}, in.z.options());
    a.gram_parts = gram_parts.mutable_data_ptr<T>();
  }
  if (plan.dz > 0) a.dz = bufs.acc[kZ].mutable_data_ptr<T>();
  if (plan.total() > 0) {
    const dim3 grid = checked_grid(plan.total(), "quadratic backward");
    auto stream = at::cuda::getCurrentCUDAStream();
    if (wide) {
      quadratic_backward_kernel<T, kTensorCores, kMayWiden><<<grid, cuda_tiles::kThreads, 0, stream>>>(a);
    } else {
      quadratic_backward_kernel<T, kTensorCores, false><<<grid, cuda_tiles::kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (dW_parts.defined()) launch_sums(dW_parts, plan.partitions, dims.k, dims.d, false, bufs.acc[kW]);
  if (gram.defined()) {
    launch_sums(gram_parts, plan.partitions, dims.k, dims.k, true, gram);
    add_grads_from_gram(in, gram_factors(in, Head{}, mask), gram, mask, bufs);
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
  const BatchPlan bp = make_batch_plan(dims, plan, kChunkScratchElems, kChunkMinRows, 1, 0, false);
  forward_aten(dims, in, plan, bp.chunk_rows, out);
}

// The direct plan's single-kernel backward (direct_kernels.cuh), where
// launch::small_backward_applies.
template <typename T>
bool small_direct_backward(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                           const OutputMask& mask, GradBuffers& bufs) {
  constexpr auto kernel = &direct::small_backward_kernel<T>;
  if (!launch::small_backward_applies(device_limits(), kernel_on_device<kernel>(), dims.N,
                                      dims.d, dims.k, dims.m, dims.ell, sizeof(T))) {
    return false;
  }
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
  const int64_t shared = launch::small_backward_dynamic_smem(dims.k, dims.m, dims.ell, sizeof(T));
  kernel<<<1, direct::kThreads, shared, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

void backward_kernel_cuda(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                          const at::Tensor& r, const at::Tensor& q, Plan plan,
                          const OutputMask& mask, GradBuffers& bufs) {
  const c10::cuda::CUDAGuard device_guard(in.z.device());
  if (plan == Plan::kDirect && fused_kernels_enabled()) {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cuda_small", [&] {
      done = small_direct_backward<scalar_t>(dims, in, g, mask, bufs);
    });
    if (done) return;
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
  const BatchPlan bp = make_batch_plan(dims, plan, kChunkScratchElems, kChunkMinRows, 1, 0, false);
  backward_aten(dims, in, g, r, q, plan, mask, bp.chunk_rows, bufs);
}

}  // namespace

void reread_cuda_switches() { fused_switch().store(read_fused_switch()); }

TORCH_LIBRARY_IMPL(torchext, CUDA, m) {
  register_kernels<&forward_kernel_cuda, &backward_kernel_cuda>(m);
}

}  // namespace torchext
