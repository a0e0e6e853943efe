// The launch decisions of csrc/cuda/launch_plan.h against the published
// limits of common cards, replayed on a model of what the CUDA runtime does
// with a kernel's MaxDynamicSharedMemorySize attribute: every float32,
// float64, bfloat16 and float16 width from 1 to 1024, going up and going
// down on one device. A launch must never exceed what the runtime allows, the
// attribute must never be left below what a later launch needs, and a kernel
// must never be turned off where it fits. The launcher of commit 634f880 is
// replayed too: these checks must catch its two bugs (the attribute set per
// width, so a smaller width lowered it; the opt-in decided on dynamic shared
// memory alone, where the 48 KiB default covers static and dynamic together).
//
// Build and run: tests/test_cuda_emulation.py. Exit status 0 and "ok" when
// every check holds.
#include "cuda_dialect.h"

#include <cstdio>
#include <map>
#include <string>

#include "../../csrc/cuda/launch_plan.h"
#include "../../csrc/cuda/quadratic_kernels.cuh"

namespace plan = torchext::launch;
namespace q = torchext::quadratic;
using plan::DeviceLimits;
using plan::KernelAttributes;

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

constexpr int64_t KiB = 1024;

struct Card {
  const char* name;
  DeviceLimits dev;
};
// NVIDIA's published per-block default and opt-in, per-SM shared memory,
// SM counts and compute capabilities.
const Card kCards[] = {
    {"H100", {48 * KiB, 227 * KiB, 228 * KiB, 132, 90}},
    {"H200", {48 * KiB, 227 * KiB, 228 * KiB, 132, 90}},
    {"A100", {48 * KiB, 163 * KiB, 164 * KiB, 108, 80}},
    {"L4", {48 * KiB, 99 * KiB, 100 * KiB, 58, 89}},
    {"RTX 4090", {48 * KiB, 99 * KiB, 100 * KiB, 128, 89}},
    {"T4", {48 * KiB, 64 * KiB, 64 * KiB, 40, 75}},
};

// The forward kernel's static shared memory, as its __shared__ arrays make it.
template <typename T, bool kTensorCores>
int64_t forward_static_smem() {
  return int64_t(sizeof(typename q::TileEngine<T, kTensorCores>::Staging) +
                 sizeof(T[q::kTile][q::tiles::kLanes + 1]));
}
// ptxas's figures for the same kernels (nvcc --resource-usage, sm_90): the
// emulated sizes are the device's only if bfloat16 is two bytes here too.
static_assert(sizeof(__nv_bfloat16) == 2);
void check_static_sizes() {
  expect(forward_static_smem<float, false>() == 13056, "float32 forward: ptxas's 13056 bytes");
  expect(forward_static_smem<double, false>() == 26112, "float64 forward: ptxas's 26112 bytes");
  expect(forward_static_smem<float, true>() == 27904, "tensor-core forward: ptxas's 27904 bytes");
}

// The runtime, for one kernel on one device: launches are refused past its
// MaxDynamicSharedMemorySize attribute (which starts at what the default
// leaves after the static arrays) or past the opt-in limit; the attribute
// itself is refused past what the opt-in leaves.
struct SimulatedKernel {
  DeviceLimits dev;
  KernelAttributes kernel;
  int64_t attribute;
  SimulatedKernel(const DeviceLimits& d, const KernelAttributes& k)
      : dev(d), kernel(k), attribute(std::max<int64_t>(0, d.smem_default_per_block - k.static_smem)) {}
  bool set_attribute(int64_t value) {
    if (value > std::max(dev.smem_default_per_block, dev.smem_optin_per_block) - kernel.static_smem) return false;
    attribute = value;
    return true;
  }
  bool launch_ok(int64_t dynamic) const {
    return dynamic <= attribute &&
           kernel.static_smem + dynamic <= std::max(dev.smem_default_per_block, dev.smem_optin_per_block);
  }
  // Resident blocks of `threads` per SM, as far as shared memory and threads
  // decide (sm_80 on reserve 1 KiB per block).
  int64_t blocks_per_sm(int threads, int64_t dynamic) const {
    const int64_t per_block = kernel.static_smem + dynamic + (dev.arch >= 80 ? KiB : 0);
    return std::min<int64_t>(2048 / threads, per_block > 0 ? dev.smem_per_sm / per_block : 2048);
  }
};

// The quadratic forward over `widths`, in order, on one device, as the
// launcher decides it now; "" or the first broken rule.
std::string replay(const DeviceLimits& dev, const KernelAttributes& kernel, int64_t elem,
                   const std::vector<int64_t>& widths) {
  SimulatedKernel sim(dev, kernel);
  const int64_t attribute = plan::dynamic_smem_attribute(dev, kernel);
  if (attribute > 0 && !sim.set_attribute(attribute)) return "attribute refused";
  for (int64_t k : widths) {
    const plan::ForwardShared shared = plan::quadratic_forward_shared(dev, kernel, k, elem);
    const bool room = kernel.static_smem + shared.dynamic_smem <= std::max(dev.smem_default_per_block, dev.smem_optin_per_block);
    if (room && !shared.fits) return "k = " + std::to_string(k) + " turned off where it fits";
    if (!shared.fits) continue;
    if (!sim.launch_ok(shared.dynamic_smem)) return "k = " + std::to_string(k) + " launch refused";
    const int64_t per_sm = sim.blocks_per_sm(q::tiles::kThreads, shared.dynamic_smem);
    if (per_sm < 1) return "k = " + std::to_string(k) + " fits but no block is resident";
    const int64_t grid = plan::quadratic_forward_grid(dev, 1 << 20, per_sm);
    if (!plan::grid_fits(grid) || grid > dev.sm_count * per_sm) return "grid past one wave";
  }
  return "";
}

// The same with the launcher of commit 634f880: decided once per width, the
// attribute set to that width's dynamic size when it passed 48 KiB.
std::string replay_634f880(const DeviceLimits& dev, const KernelAttributes& kernel, int64_t elem,
                           const std::vector<int64_t>& widths) {
  SimulatedKernel sim(dev, kernel);
  std::map<int64_t, bool> decided;
  for (int64_t k : widths) {
    const int64_t dynamic = 64 * k * elem;
    if (!decided.count(k)) {
      const bool fits = kernel.static_smem + dynamic <= dev.smem_optin_per_block;
      if (fits && dynamic > 48 * KiB && !sim.set_attribute(dynamic)) return "attribute refused";
      decided[k] = fits;
    }
    if (decided[k] && !sim.launch_ok(dynamic)) return "k = " + std::to_string(k) + " launch refused";
  }
  return "";
}

std::vector<int64_t> up_and_down() {
  std::vector<int64_t> widths;
  for (int64_t k = 1; k <= 1024; ++k) widths.push_back(k);
  for (int64_t k = 1024; k >= 1; --k) widths.push_back(k);
  for (int64_t k : {512, 256, 512, 1024, 1, 1024, 700, 900, 160, 1000}) widths.push_back(k);
  return widths;
}

void check_forward_widths() {
  const KernelAttributes f32{forward_static_smem<float, false>(), 90};
  const KernelAttributes f64{forward_static_smem<double, false>(), 90};
  for (const Card& card : kCards) {
    const KernelAttributes tc{forward_static_smem<float, true>(), card.dev.arch};
    const bool tensor_cores = plan::use_tensor_core_tiles(true, card.dev, tc);
    expect(tensor_cores == (card.dev.arch >= 80), std::string(card.name) + ": tensor-core tiles where the card has them");
    const struct {
      const char* dtype;
      KernelAttributes kernel;
      int64_t elem;
    } kernels[] = {{"float32", f32, 4},
                   {"float64", f64, 8},
                   {"bfloat16", tensor_cores ? tc : f32, 4},
                   {"float16", f32, 4}};  // float16 inputs take the SIMT kernels
    for (const auto& kn : kernels) {
      const std::string why = replay(card.dev, kn.kernel, kn.elem, up_and_down());
      expect(why.empty(), std::string(card.name) + " " + kn.dtype + ": " + why);
    }
  }
  // The old launcher fails these checks, so they encode its bugs.
  const DeviceLimits h100 = kCards[0].dev;
  expect(!replay_634f880(h100, f32, 4, {800, 400, 800}).empty(),
         "the checks catch an attribute lowered by a smaller width");
  expect(!replay_634f880(h100, f32, 4, {160}).empty(),
         "the checks catch static shared memory left out of the opt-in");
  expect(!replay_634f880(h100, f32, 4, up_and_down()).empty(), "the width sweep catches the old launcher");
}

void check_tensor_core_choice() {
  const DeviceLimits a100 = kCards[2].dev, h100 = kCards[0].dev, t4 = kCards[5].dev;
  const int64_t tc_static = forward_static_smem<float, true>();
  expect(!plan::use_tensor_core_tiles(true, t4, {tc_static, 75}), "T4: no bfloat16 tensor-core tiles");
  expect(!plan::use_tensor_core_tiles(true, a100, {tc_static, 75}),
         "A100 running a build without sm_80 code: SIMT, not the tiles' trap");
  expect(!plan::use_tensor_core_tiles(true, h100, {tc_static, 75}), "H100 running sm_75 PTX: SIMT");
  expect(plan::use_tensor_core_tiles(true, a100, {tc_static, 80}), "A100 with sm_80 code: tensor cores");
  expect(plan::use_tensor_core_tiles(true, h100, {tc_static, 80}), "H100 with sm_80 PTX: tensor cores");
  expect(plan::use_tensor_core_tiles(true, h100, {tc_static, 90}), "H100 with sm_90 code: tensor cores");
  expect(!plan::use_tensor_core_tiles(false, h100, {tc_static, 90}), "float32 inputs: SIMT");
}

// The direct plan's warp forward: scratch only past the default shared
// memory, and for one wave of warps, never for the batch.
void check_direct_forward() {
  const KernelAttributes warp_kernel{0, 90};
  for (const Card& card : kCards) {
    for (int64_t elem : {int64_t(4), int64_t(8)})
      for (int64_t k : {int64_t(1), int64_t(100), int64_t(1535), int64_t(1536), int64_t(3000), int64_t(4000)}) {
        const int64_t m = 8, bytes = plan::kDirectForwardWarps * (k + m) * elem;
        const plan::DirectForwardShared shared = plan::direct_forward_shared(card.dev, warp_kernel, k, m, elem);
        expect(shared.scratch == (bytes > 48 * KiB), std::string(card.name) + ": scratch exactly past 48 KiB");
        expect(shared.dynamic_smem == (shared.scratch ? 0 : bytes), "dynamic shared memory of the warp forward");
        const SimulatedKernel sim(card.dev, warp_kernel);
        expect(sim.launch_ok(shared.dynamic_smem), std::string(card.name) + ": warp forward launches");
        const int64_t per_sm = sim.blocks_per_sm(plan::kDirectForwardWarps * 32, shared.dynamic_smem);
        for (int64_t N : {int64_t(1), int64_t(3), int64_t(4), int64_t(5), int64_t(65536), int64_t(1) << 33}) {
          const int64_t grid = plan::direct_forward_grid(card.dev, N, per_sm);
          expect(plan::grid_fits(grid) && grid <= card.dev.sm_count * per_sm &&
                     grid <= plan::ceil_div(N, plan::kDirectForwardWarps),
                 "warp forward grid: one wave at most, no idle block");
        }
      }
  }
  // The case: N = 65536, d = 16, k = 4000, m = 8, float32, on an H200.
  const DeviceLimits h200 = kCards[1].dev;
  const SimulatedKernel sim(h200, warp_kernel);
  const plan::DirectForwardShared shared = plan::direct_forward_shared(h200, warp_kernel, 4000, 8, 4);
  const int64_t grid = plan::direct_forward_grid(h200, 65536, sim.blocks_per_sm(128, shared.dynamic_smem));
  const int64_t bytes = plan::direct_forward_scratch_elems(grid, 4000, 8) * 4;
  const int64_t bytes_634f880 = std::min<int64_t>(65536 / 4, 8192) * 4 * (4000 + 8) * 4;
  expect(shared.scratch && bytes <= 132 * 16 * 4 * 4008 * 4 && 3 * bytes < bytes_634f880,
         "direct forward scratch sized to one wave (" + std::to_string(bytes) + " bytes)");
}

void check_backward_and_grids() {
  // Partitions by the shapes alone; blocks in a grid CUDA takes, or refused.
  expect(plan::backward_partitions(5000, 48, 80) == 9, "partitions of 5000 samples");
  expect(plan::backward_partitions(100, 48, 80) == 1, "one partition for a small batch");
  expect(plan::backward_partitions(1 << 22, 4096, 4096) == 2, "partitions within the partials' budget");
  const plan::BackwardBlocks b = plan::quadratic_backward_blocks(5000, 48, 80, 9, false, true, true, true);
  expect(b.dW == 9 * 2 * 1 && b.gram == 9 * 3 && b.dz == 79 && b.rows_per_partition == 556, "backward block counts");
  const plan::BackwardBlocks wide = plan::quadratic_backward_blocks(300, 200, 257, 1, true, true, false, false);
  expect(wide.dW == 3 * 2 && wide.gram == 0 && wide.dz == 0, "wide-tile block counts");
  expect(plan::backward_wide_tiles(true, 128, 128) && !plan::backward_wide_tiles(true, 127, 128) &&
             !plan::backward_wide_tiles(false, 512, 512),
         "wide tiles for float32 SIMT at k, d >= 128 only");
  const plan::BackwardBlocks huge =
      plan::quadratic_backward_blocks(int64_t(1) << 38, 64, 8, 64, false, false, false, true);
  expect(!plan::grid_fits(huge.total()), "a grid past 2^31 - 1 blocks is refused");
  expect(plan::grid_fits(plan::kMaxGridX) && !plan::grid_fits(0), "grid limits");
  expect(plan::sum_partitions_grid(1) == 1 && plan::sum_partitions_grid(int64_t(1) << 40) == 4096,
         "sum-of-partitions grid");
  // The small-batch backward: its shared memory, static included, within
  // the default.
  const KernelAttributes with_static{12800, 90}, plain{0, 90};
  const DeviceLimits h100 = kCards[0].dev;
  expect(!plan::fits_without_opt_in(h100, with_static, 40000) && plan::fits_without_opt_in(h100, plain, 40000),
         "static shared memory counts against the default");
  expect(plan::small_backward_applies(h100, plain, 1, 16, 16, 16, 16, 4), "the seed's backward in one block");
  expect(!plan::small_backward_applies(h100, plain, 1, 1, 6200, 1, 1, 4), "too wide for one block's shared memory");
  expect(!plan::small_backward_applies(h100, plain, 65, 1, 1, 1, 1, 4), "too many samples for one block");
}

int main() {
  check_static_sizes();
  check_forward_widths();
  check_tensor_core_choice();
  check_direct_forward();
  check_backward_and_grids();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
