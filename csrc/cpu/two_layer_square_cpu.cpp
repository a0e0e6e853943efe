// The CPU backend's driver: the batch cut into chunks of rows (see BatchPlan)
// whose working set stays in cache while the per-chunk algebra
// (chunk_kernels.h) runs on it; chunks (forward) or partitions of chunks
// (backward, each with its own partial weight gradients, summed in a fixed
// order) are the parallel tasks (parallel_tasks, blas.h). Registers the CPU
// kernels of every op.
#include "../head.h"
#include "../kernel_frames.h"
#include "batch_plan_cpu.h"
#include "chunk_kernels.h"
#include "head_products.h"
#include "huge_pages.h"
#include "kernel_set.h"
#include "narrow_kernels.h"
#include "workspace.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>
#include <vector>

namespace torchext {
namespace cpu {
namespace {

// Working set of one chunk: about this many elements (a per-core L2), and
// never fewer rows than kChunkMinRows, except that a batch of few chunks is
// split further into chunks of at least kMinChunkWork multiply-adds in the
// forward, and twice that in the backward, whose partitions also make and sum
// partial weight gradients (see make_batch_plan).
constexpr int64_t kChunkScratchElems = int64_t{1} << 17;
constexpr int64_t kChunkMinRows = 256;
constexpr int64_t kMaxPartitions = 8;
constexpr int64_t kMinChunkWork = int64_t{1} << 18;

// The quadratic plan of narrow float32 layers runs the narrow kernels of the
// SIMD kernel set where one runs (simd_kernels.h says why): their weights,
// or nullopt for the BLAS kernels below. (head.Q is undefined when the
// backward has saved q and needs no Q.)
template <typename T>
std::optional<NarrowWeights> narrow_weights(const Dims& dims, Plan plan, const ComputeInputs& in,
                                            const Head& head) {
  if constexpr (std::is_same_v<T, float>) {
    if (plan == Plan::kQuadratic && dims.k <= kNarrowMaxK && dims.d <= kNarrowMaxD &&
        float32_simd_kernels() != nullptr)
      return NarrowWeights(dims.d, dims.k, in.W.const_data_ptr<float>(),
                           head.Q.defined() ? head.Q.const_data_ptr<float>() : nullptr);
  }
  return std::nullopt;
}

// A thread's buffers: the narrow kernels' workspace (accumulate: with room
// for the backward's partial sums), or the BLAS kernels' chunk scratch.
template <typename T>
struct ThreadBuffers {
  std::optional<ChunkScratch<T>> scratch;
  std::optional<NarrowWorkspace> workspace;
  ThreadBuffers(const std::optional<NarrowWeights>& narrow, const Dims& dims, Plan plan,
                int64_t rows, bool accumulate) {
    if (narrow) {
      workspace.emplace(*narrow, accumulate);
    } else {
      scratch.emplace(dims, plan, rows);
    }
  }
};

// A chunk's rows of the incoming gradient g (stride 1 or 0, see
// grad_to_compute): a pointer into g, or the broadcast value spread over a
// per-thread buffer of the chunk's length.
template <typename T>
class ChunkGrad {
 public:
  ChunkGrad(const at::Tensor& g, int64_t rows)
      : g_(g.const_data_ptr<T>()), broadcast_(grad_stride(g) == 0 && g.size(0) > 1) {
    if (broadcast_) {
      fill_ = aligned_block<T>(arena_, rows);
      std::fill(fill_, fill_ + rows, g_[0]);
    }
  }
  const T* rows(int64_t r0) const { return broadcast_ ? fill_ : g_ + r0; }

 private:
  ThreadArena<struct ChunkGradTag> arena_;
  const T* g_;
  bool broadcast_;
  T* fill_ = nullptr;
};

template <typename T>
void forward_impl(const Dims& dims, const ComputeInputs& in, Plan plan,
                  ForwardOutputs& out) {
  const BatchPlan bp = cpu_batch_plan(dims, plan, /*training=*/false);
  const Head head = fold_head(in, plan, &cpu_mm);
  const bool save = out.r.size(0) == dims.N;
  T* f = out.f.mutable_data_ptr<T>();
  if (save) {
    advise_huge_pages(out.r);
    advise_huge_pages(out.q);
  }
  T* r_saved = save ? out.r.mutable_data_ptr<T>() : nullptr;
  T* q_saved = save ? out.q.mutable_data_ptr<T>() : nullptr;
  const std::optional<NarrowWeights> narrow = narrow_weights<T>(dims, plan, in, head);
  const Operands<T> op = operands<T>(in, head);
  // No reduction across samples here, so chunks are the tasks.
  parallel_tasks(bp.num_chunks, [&](const auto& claim) {
    ThreadBuffers<T> buffers(narrow, dims, plan, std::min(bp.chunk_rows, dims.N),
                             /*accumulate=*/false);
    for (int64_t c; (c = claim()) >= 0;) {
      const int64_t r0 = c * bp.chunk_rows;
      const int64_t n = std::min(bp.chunk_rows, dims.N - r0);
      if constexpr (std::is_same_v<T, float>) {
        if (narrow) {
          narrow_forward(*narrow, op.z + r0 * dims.d, n, f + r0,
                              save ? r_saved + r0 * dims.k : nullptr,
                              save ? q_saved + r0 * dims.k : nullptr, *buffers.workspace);
          continue;
        }
      }
      ChunkScratch<T>& s = *buffers.scratch;
      T* r = save ? r_saved + r0 * dims.k : s.r;
      T* q = save ? q_saved + r0 * dims.k : s.q;
      forward_chunk(dims, plan, op, op.z + r0 * dims.d, n, save, f + r0, r, q, s);
    }
  });
}

// What each partition accumulates: dW, and either the Gram (k×k) or the
// direct chain's dV, dB, dA. Partition 0 writes into the results (or the
// Gram) directly, the others into partials (workspace from the calling
// thread's arena) added in partition order by reduce(). Nothing is
// zero-filled (the results come uninitialised, see internal_backward; the
// partials hold whatever the arena held): a partition's first chunk writes
// its slots, later chunks add (the narrow kernels' flush writes them); of the
// Gram only the upper triangle is written, and mirrored after the reduce.
template <typename T>
class PartitionSums {
 public:
  PartitionSums(const BatchPlan& bp, const OutputMask& mask, const at::Tensor& gram,
                GradBuffers& bufs)
      : partitions_(bp.partitions) {
    const bool use_gram = gram.defined();
    const at::Tensor total[kSlots] = {mask[kW] ? bufs.acc[kW] : at::Tensor(),
                                      mask[kV] && !use_gram ? bufs.acc[kV] : at::Tensor(),
                                      mask[kB] && !use_gram ? bufs.acc[kB] : at::Tensor(),
                                      mask[kA] && !use_gram ? bufs.acc[kA] : at::Tensor(), gram};
    for (int i = 0; i < kSlots; ++i) {
      total_[i] = total[i].defined() ? total[i].template mutable_data_ptr<T>() : nullptr;
      numel_[i] = total[i].defined() ? total[i].numel() : 0;
      // each slot of a partial 64-byte aligned (see aligned_block)
      partial_offset_[i + 1] = partial_offset_[i] + padded_elems(numel_[i]);
    }
    if (partitions_ > 1)
      partials_ = aligned_block<T>(arena_, (partitions_ - 1) * partial_offset_[kSlots]);
  }

  PartitionSlots<T> slots(int64_t part) const {
    auto slot = [&](int i) -> T* {
      if (total_[i] == nullptr) return nullptr;
      return part == 0 ? total_[i] : partial(part, i);
    };
    return {slot(kSlotW), slot(kSlotV), slot(kSlotB), slot(kSlotA), slot(kSlotGram)};
  }

  // Each element summed in partition order, on raw pointers (at the small
  // sizes that split a batch, an add_ per partial cost more than the sums);
  // the slots' elements as one range, in tasks of kReduceGrain elements.
  void reduce() {
    if (partitions_ < 2) return;
    std::array<int64_t, kSlots + 1> start{};  // slot i: elements [start[i], start[i + 1]) of the range
    for (int i = 0; i < kSlots; ++i) start[i + 1] = start[i] + numel_[i];
    parallel_ranges(start[kSlots], kReduceGrain, [&](int64_t e0, int64_t e1) {
      for (int i = 0; i < kSlots; ++i) {
        const int64_t b = std::max(e0, start[i]) - start[i], e = std::min(e1, start[i + 1]) - start[i];
        T* out = total_[i];
        for (int64_t p = 1; p < partitions_; ++p) {
          const T* in = partial(p, i);
          for (int64_t x = b; x < e; ++x) out[x] += in[x];
        }
      }
    });
  }

 private:
  enum Slot { kSlotW, kSlotV, kSlotB, kSlotA, kSlotGram, kSlots };
  static constexpr int64_t kReduceGrain = int64_t{1} << 14;
  T* partial(int64_t part, int i) const {
    return partials_ + (part - 1) * partial_offset_[kSlots] + partial_offset_[i];
  }
  int64_t partitions_;
  std::array<T*, kSlots> total_{};
  std::array<int64_t, kSlots> numel_{};
  std::array<int64_t, kSlots + 1> partial_offset_{};  // slot i's place in each partial
  ThreadArena<struct PartialSumsTag> arena_;
  T* partials_ = nullptr;
};

// One partition's chunks, in order, into its sums.
template <typename T>
void backward_partition(const BackwardCall<T>& call, const BatchPlan& bp, int64_t part,
                        const PartitionSlots<T>& sums, const ChunkGrad<T>& chunk_grad,
                        const std::optional<NarrowWeights>& narrow, ThreadBuffers<T>& buffers) {
  const Dims& dims = call.dims;
  const int64_t c_begin = part * bp.chunks_per_partition;
  const int64_t c_end = std::min(bp.num_chunks, c_begin + bp.chunks_per_partition);
  for (int64_t c = c_begin; c < c_end; ++c) {
    const int64_t r0 = c * bp.chunk_rows;
    const int64_t n = std::min(bp.chunk_rows, dims.N - r0);
    const T* gc = chunk_grad.rows(r0);
    if constexpr (std::is_same_v<T, float>) {
      if (narrow) {  // the whole chain, accumulating into the workspace
        const bool saved = !call.recompute;
        narrow_backward(*narrow, call.op.z + r0 * dims.d, gc,
                        saved ? call.r_saved + r0 * dims.k : nullptr,
                        saved ? call.q_saved + r0 * dims.k : nullptr, n, sums.gW != nullptr,
                        sums.G != nullptr, call.gz ? call.gz + r0 * dims.d : nullptr,
                        *buffers.workspace);
        continue;
      }
    }
    backward_chunk(call, sums, r0, n, gc, /*first=*/c == c_begin, *buffers.scratch);
  }
  if constexpr (std::is_same_v<T, float>) {
    if (narrow) buffers.workspace->flush(*narrow, sums.gW, sums.G);  // writes the partition's sums
  }
}

template <typename T>
void backward_impl(const Dims& dims, const ComputeInputs& in, const at::Tensor& grad,
                   const at::Tensor& r_saved, const at::Tensor& q_saved, Plan plan,
                   const OutputMask& mask, GradBuffers& bufs) {
  const BatchPlan bp = cpu_batch_plan(dims, plan, /*training=*/true);
  // Without saved r and q (see keeps_saved), each chunk recomputes them.
  const bool recompute = !r_saved.defined();
  const Head head = recompute ? fold_head(in, plan, &cpu_mm) : Head{};
  const bool direct = plan == Plan::kDirect;
  const bool saved_y = direct && !recompute && direct_saves_y(dims);
  if (mask[kZ]) advise_huge_pages(bufs.acc[kZ]);
  const bool use_gram = (mask[kV] || mask[kB] || mask[kA]) && !direct;
  at::Tensor gram = use_gram ? uninitialized({dims.k, dims.k}, in.z.options()) : at::Tensor();
  const GramFactors factors = use_gram ? gram_factors(in, head, mask, &cpu_mm) : GramFactors{};
  PartitionSums<T> sums(bp, mask, gram, bufs);
  const std::optional<NarrowWeights> narrow = narrow_weights<T>(dims, plan, in, head);
  const Operands<T> op = operands<T>(in, head);
  parallel_tasks(bp.partitions, [&](const auto& claim) {
    const BackwardCall<T> call{dims, plan, op,
                               recompute ? nullptr : r_saved.const_data_ptr<T>(),
                               recompute ? nullptr : q_saved.const_data_ptr<T>(), recompute,
                               mask[kZ] ? bufs.acc[kZ].mutable_data_ptr<T>() : nullptr,
                               mask[kZ] || mask[kW], use_gram, saved_y};
    const int64_t rows = std::min(bp.chunk_rows, dims.N);
    ThreadBuffers<T> buffers(narrow, dims, plan, rows, /*accumulate=*/true);
    const ChunkGrad<T> chunk_grad(grad, rows);
    for (int64_t part; (part = claim()) >= 0;)
      backward_partition(call, bp, part, sums.slots(part), chunk_grad, narrow, buffers);
  });
  sums.reduce();
  if (use_gram) {  // the Gram's lower triangle from its upper, then dV, dB, dA
    const int64_t k = dims.k;
    T* G = gram.mutable_data_ptr<T>();
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < i; ++j) G[i * k + j] = G[j * k + i];
    add_grads_from_gram(in, factors, gram, mask, bufs, &cpu_mm);
  }
}

void forward_kernel_cpu(const Dims& dims, const ComputeInputs& in, Plan plan,
                        ForwardOutputs& out) {
  float32_simd_kernels();  // raises on a TORCHEXT_CPU_KERNELS that cannot be honoured, whatever the dtype
  AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_cpu", [&] {
    forward_impl<scalar_t>(dims, in, plan, out);
  });
}

void backward_kernel_cpu(const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                         const at::Tensor& r, const at::Tensor& q, Plan plan,
                         const OutputMask& mask, GradBuffers& bufs) {
  float32_simd_kernels();  // (as in the forward)
  AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cpu", [&] {
    backward_impl<scalar_t>(dims, in, g, r, q, plan, mask, bufs);
  });
}

}  // namespace

BatchPlan cpu_batch_plan(const Dims& dims, Plan plan, bool training) {
  return make_batch_plan(dims, plan, kChunkScratchElems, kChunkMinRows, kMaxPartitions,
                         training ? 2 * kMinChunkWork : kMinChunkWork, training);
}

}  // namespace cpu

TORCH_LIBRARY_IMPL(torchext, CPU, m) {
  register_kernels<&cpu::forward_kernel_cpu, &cpu::backward_kernel_cpu>(m);
}

}  // namespace torchext
