// Every launch decision of the CUDA backend, as plain C++ on plain numbers:
// no CUDA runtime, no ATen. two_layer_square_cuda.cu feeds it the device's
// limits and the kernels' attributes and launches what it says;
// tests/cuda_emulation checks the decisions against the limits of common
// cards. The kernels include it for the layouts they share with the host.
#pragma once

#include <algorithm>
#include <cstdint>

namespace torchext {
namespace launch {

// What the launcher reads of the device (cudaDeviceProp).
struct DeviceLimits {
  int64_t smem_default_per_block;  // static + dynamic without opt-in (48 KiB)
  int64_t smem_optin_per_block;    // sharedMemPerBlockOptin
  int64_t smem_per_sm;             // sharedMemPerMultiprocessor
  int64_t sm_count;
  int arch;  // compute capability, 10 · major + minor
};

// What the launcher reads of a kernel on the device (cudaFuncAttributes).
struct KernelAttributes {
  int64_t static_smem;  // sharedSizeBytes
  int ptx_arch;         // ptxVersion: the virtual architecture its code was built for
};

// gridDim.x's limit.
constexpr int64_t kMaxGridX = 2147483647;
constexpr bool grid_fits(int64_t blocks) { return blocks >= 1 && blocks <= kMaxGridX; }

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most dynamic shared memory a kernel can ever launch with on the device.
constexpr int64_t max_dynamic_smem(const DeviceLimits& dev, const KernelAttributes& kernel) {
  return std::max<int64_t>(
      0, std::max(dev.smem_default_per_block, dev.smem_optin_per_block) - kernel.static_smem);
}

// The kernel's MaxDynamicSharedMemorySize attribute, set once per device
// before its first launch (0: leave the default): all that the device allows,
// so that no later launch needs it raised and none lowers it. The attribute
// belongs to the kernel on the device, not to a launch, so a per-width value
// would be overwritten by the next width's.
constexpr int64_t dynamic_smem_attribute(const DeviceLimits& dev, const KernelAttributes& kernel) {
  return dev.smem_optin_per_block > dev.smem_default_per_block ? max_dynamic_smem(dev, kernel) : 0;
}

// A launch with `dynamic` bytes that needs no attribute: the default limit
// covers static and dynamic shared memory together.
constexpr bool fits_without_opt_in(const DeviceLimits& dev, const KernelAttributes& kernel,
                                   int64_t dynamic) {
  return kernel.static_smem + dynamic <= dev.smem_default_per_block;
}

// A persistent grid: one wave of resident blocks, or fewer where the work has
// fewer blocks.
constexpr int64_t persistent_grid(const DeviceLimits& dev, int64_t work_blocks,
                                  int64_t blocks_per_sm) {
  return std::max<int64_t>(1, std::min(work_blocks, dev.sm_count * blocks_per_sm));
}

// bfloat16 inputs take the tensor-core tiles where the device has them
// (sm_80) and the tiles' code was built for it: a build without an sm_80 or
// newer architecture runs PTX of an older one there, whose tiles trap.
constexpr bool use_tensor_core_tiles(bool bfloat16_input, const DeviceLimits& dev,
                                     const KernelAttributes& tensor_core_kernel) {
  return bfloat16_input && dev.arch >= 80 && tensor_core_kernel.ptx_arch >= 80;
}

// --- the quadratic plan's fused forward ---------------------------------------

constexpr int64_t kForwardTileRows = 64;

// The tile's r in shared memory: rows of k rounded up to 4 elements, so that
// a thread's 4 columns move as 16-byte accesses.
constexpr int64_t forward_r_stride(int64_t k) { return (k + 3) / 4 * 4; }

constexpr int64_t forward_dynamic_smem(int64_t k, int64_t elem_size) {
  return kForwardTileRows * forward_r_stride(k) * elem_size;
}

struct ForwardShared {
  bool fits;  // else the caller runs the ATen path
  int64_t dynamic_smem;
};

constexpr ForwardShared quadratic_forward_shared(const DeviceLimits& dev,
                                                 const KernelAttributes& kernel, int64_t k,
                                                 int64_t elem_size) {
  const int64_t dynamic = forward_dynamic_smem(k, elem_size);
  return {dynamic <= max_dynamic_smem(dev, kernel), dynamic};
}

constexpr int64_t quadratic_forward_grid(const DeviceLimits& dev, int64_t N,
                                         int64_t blocks_per_sm) {
  return persistent_grid(dev, ceil_div(N, kForwardTileRows), blocks_per_sm);
}

// --- the quadratic plan's fused backward --------------------------------------

// The batch partition: by the shapes alone (never the device), so the sums,
// and the results, are the same on every card.
constexpr int64_t kMinRowsPerPartition = 512;
constexpr int64_t kMaxPartitions = 64;
constexpr int64_t kPartialElemsBudget = int64_t{1} << 25;

constexpr int64_t backward_partitions(int64_t N, int64_t d, int64_t k) {
  const int64_t parts = std::min(kMaxPartitions, std::max<int64_t>(1, N / kMinRowsPerPartition));
  const int64_t per_part = std::max<int64_t>(1, k * std::max(d, k));
  return std::min(parts, std::max<int64_t>(1, kPartialElemsBudget / per_part));
}

// float32 SIMT with wide layers: 128 × 128 tiles for dW and the Gram;
// narrower layers would leave most of such a tile empty.
constexpr bool backward_wide_tiles(bool float32_simt, int64_t d, int64_t k) {
  return float32_simt && k >= 128 && d >= 128;
}

// The backward kernel's blocks, in launch order (quadratic_kernels.cuh), over
// `parts` partitions of the batch (backward_partitions).
struct BackwardBlocks {
  int64_t partitions, rows_per_partition;
  int64_t dW, gram, dz;
  constexpr int64_t total() const { return dW + gram + dz; }
};

constexpr BackwardBlocks quadratic_backward_blocks(int64_t N, int64_t d, int64_t k, int64_t parts,
                                                   bool wide, bool want_dW, bool want_gram,
                                                   bool want_dz) {
  const int64_t tile = wide ? 128 : 64;
  const int64_t k_tiles = ceil_div(k, tile);
  BackwardBlocks b{parts, ceil_div(N, parts), 0, 0, 0};
  if (want_dW) b.dW = parts * k_tiles * ceil_div(d, tile);
  if (want_gram) b.gram = parts * k_tiles * (k_tiles + 1) / 2;
  if (want_dz) b.dz = ceil_div(N, 64) * ceil_div(d, 64);
  return b;
}

constexpr int kSumThreads = 256;
constexpr int64_t sum_partitions_grid(int64_t elems) {
  return std::min<int64_t>(ceil_div(elems, kSumThreads), 4096);
}

// --- the direct plan ------------------------------------------------------------

// Warps per block of the warp forward (a warp per sample).
constexpr int kDirectForwardWarps = 4;

// Where the warp forward keeps each warp's k + m elements: shared memory
// where it fits without opt-in, else global scratch.
struct DirectForwardShared {
  bool scratch;
  int64_t dynamic_smem;  // 0 with scratch
};

constexpr DirectForwardShared direct_forward_shared(const DeviceLimits& dev,
                                                    const KernelAttributes& kernel, int64_t k,
                                                    int64_t m, int64_t elem_size) {
  const int64_t bytes = kDirectForwardWarps * (k + m) * elem_size;
  const bool scratch = !fits_without_opt_in(dev, kernel, bytes);
  return {scratch, scratch ? 0 : bytes};
}

constexpr int64_t direct_forward_grid(const DeviceLimits& dev, int64_t N, int64_t blocks_per_sm) {
  return persistent_grid(dev, ceil_div(N, kDirectForwardWarps), blocks_per_sm);
}

// Elements of global scratch for a grid: the grid's warps, not the batch's.
constexpr int64_t direct_forward_scratch_elems(int64_t grid, int64_t k, int64_t m) {
  return grid * kDirectForwardWarps * (k + m);
}

// The small-batch backward's one block keeps r, p, u, gu and y in shared
// memory (2k + 2m + ell elements).
constexpr int64_t small_backward_dynamic_smem(int64_t k, int64_t m, int64_t ell,
                                              int64_t elem_size) {
  return (2 * k + 2 * m + ell) * elem_size;
}

// It takes batches this small, whose work is too little to fill more than one
// multiprocessor, where its shared memory fits without opt-in.
constexpr int64_t kSmallBatchMax = 64;
constexpr double kSmallBatchMaxWork = double(1 << 22);

constexpr bool small_backward_applies(const DeviceLimits& dev, const KernelAttributes& kernel,
                                      int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell,
                                      int64_t elem_size) {
  const double work = double(N) * double(k * d + m * k + ell * m);
  return N <= kSmallBatchMax && work <= kSmallBatchMaxWork &&
         fits_without_opt_in(dev, kernel, small_backward_dynamic_smem(k, m, ell, elem_size));
}

}  // namespace launch
}  // namespace torchext
