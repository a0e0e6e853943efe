// The plan of a call: which association of the head it computes (the cost
// model that picks one), what a forward keeps for its backward (the state),
// and how the batch is split into chunks and partitions.
#pragma once

#include "checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace torchext {

// Whether a training forward keeps r and q for the backward. Saving costs
// about 64·k per sample in memory traffic (written, read back, fresh pages);
// recomputing them chunk by chunk in the backward costs about k·(d + k):
// narrow layers recompute. Depends on d and k only, never on N, so a batch
// size that changes under torch.compile never changes the outputs' shapes.
template <typename Int>
bool keeps_saved(const Int& d, const Int& k) {
  return d + k >= 64;
}



// The plan: which association of the head A·(B·V·r)² a call computes.
//   direct     y = B (V r), f = Σ a y²                per sample k·d + m·k + ell·m
//   folded     M = B V once; y = M r                  per sample k·d + ell·k
//   quadratic  Q = Mᵀ diag(a) M once; f = rᵀ Q r      per sample k·d + k²
// The folded and quadratic plans also yield q = ½ ∂f/∂r = Mᵀ diag(a) M r, so
// their backward needs p = 2 g q ⊙ 1[r > 0] and, for V, B and A, the Gram
// G = Σ g r rᵀ. The direct plan's backward runs the chain in eager's order
// instead; its second saved tensor (the q slot) holds y = B V r in columns
// [0, ell) when ell <= k (zeros after; zeros throughout when ell > k), so the
// backward starts from y rather than running V and B again.
enum class Plan { kDirect = 0, kFolded = 1, kQuadratic = 2 };

// Whether the direct plan's saved q slot holds y (see Plan).
inline bool direct_saves_y(const Dims& dims) { return dims.ell <= dims.k; }

const char* plan_name(Plan plan);

// Multiply-adds of one call as fixed + per_sample · N: the forward, plus
// (training) a backward with the W and V gradients.
struct PlanCost {
  double fixed, per_sample;
};
PlanCost plan_cost(int64_t d, int64_t k, int64_t m, int64_t ell, Plan plan, bool training);

// Whether cost a(N) < 0.98 · cost b(N), decided as a threshold on the integer
// N: a symbolic N (torch.compile, dynamic shapes) gets the answer a concrete
// one would, under a guard on N's range.
template <typename Int>
bool cheaper(const Int& N, const PlanCost& a, const PlanCost& b) {
  const double c = a.per_sample - 0.98 * b.per_sample;
  const double rhs = 0.98 * b.fixed - a.fixed;
  if (c == 0) return rhs > 0;
  const double x = rhs / c;  // c·N < rhs  <=>  N < x (c > 0) or N > x (c < 0)
  constexpr double kHuge = 4e18;
  if (c > 0) return x > kHuge || (x > 0 && N < static_cast<int64_t>(std::ceil(x)));
  return x < 0 || (x <= kHuge && N > static_cast<int64_t>(std::floor(x)));
}

// The plan a name other than "auto" forces.
inline std::optional<Plan> forced_plan(c10::string_view name) {
  if (name == "direct") return Plan::kDirect;
  if (name == "folded") return Plan::kFolded;
  if (name == "quadratic") return Plan::kQuadratic;
  return std::nullopt;
}

// "auto" takes the cheapest plan by plan_cost (ties to the more accurate
// association: direct, then folded); any other name is forced.
template <typename Int>
Plan resolve_plan(const Int& N, int64_t d, int64_t k, int64_t m, int64_t ell,
                  c10::string_view name, bool training) {
  if (const auto forced = forced_plan(name)) return *forced;
  Plan best = Plan::kDirect;
  PlanCost best_cost = plan_cost(d, k, m, ell, best, training);
  for (Plan p : {Plan::kFolded, Plan::kQuadratic}) {
    const PlanCost c = plan_cost(d, k, m, ell, p, training);
    if (cheaper(N, c, best_cost)) {
      best = p;
      best_cost = c;
    }
  }
  return best;
}
inline Plan resolve_plan(const Dims& dims, c10::string_view name, bool training) {
  return resolve_plan(dims.N, dims.d, dims.k, dims.m, dims.ell, name, training);
}

// What a forward kept for its backward. A training forward (save) resolves
// the plan once, and it travels to every backward of that forward
// (per-member backwards under vmap included, whose batch sizes would resolve
// "auto" differently): the saved r and q are only valid for the plan that
// wrote them (the direct plan's q slot holds y). It travels as the shape of a
// tensor with no elements, `state` = (0, plan, saved), on z's device: a shape
// is known on the host without a device sync, and torch.compile's shape
// inference sees it (the Meta kernel resolves the plan too, guarding on the
// range of N where it holds). An inference forward (no save) carries a
// forced plan, or "auto" unresolved, which a backward resolves as the
// public backward does: so its shape inference needs no guard, and
// torch.export keeps a dynamic batch.
struct SavedState {
  static constexpr int64_t kAuto = 3;  // the plan slot of an unresolved "auto"
  int64_t plan;                        // a Plan, or kAuto
  bool saved;  // r and q hold (N, k) values; else the backward recomputes them
  Plan resolved(const Dims& dims) const {
    return plan == kAuto ? resolve_plan(dims, "auto", /*training=*/true) : static_cast<Plan>(plan);
  }
};
// The state of a forward with these sizes; N may be symbolic (Meta).
template <typename Int>
SavedState forward_state(const Int& N, int64_t d, int64_t k, int64_t m, int64_t ell,
                         c10::string_view plan_name, bool save, bool saved) {
  if (const auto forced = forced_plan(plan_name)) return {static_cast<int64_t>(*forced), saved};
  if (!save) return {SavedState::kAuto, saved};
  return {static_cast<int64_t>(resolve_plan(N, d, k, m, ell, plan_name, /*training=*/true)), saved};
}
at::Tensor make_state(const SavedState& state, const at::TensorOptions& z_options);
// Raises ValueError on a tensor that make_state did not make.
SavedState read_state(const at::Tensor& state);
// The saved r and q match the state: (N, k) each when saved (N = the
// backward's batch), compute dtype, z's device; ignored otherwise. On
// SymInts, so the Meta kernel checks what the real kernels check.
void check_saved(const SymDims& dims, const at::Tensor& z, const SavedState& state,
                 const at::Tensor& r, const at::Tensor& q);

// How a call splits the batch. Depends on the sizes only, never on the thread
// count or timing, so every reduction over samples has a fixed order:
// rows [0, N) are cut into chunks of `chunk_rows`; consecutive chunks are
// grouped into `partitions` groups; each partition accumulates its own
// partial weight gradients over its chunks in order, and the partials are
// summed in partition order.
struct BatchPlan {
  int64_t chunk_rows;
  int64_t num_chunks;
  int64_t partitions;
  int64_t chunks_per_partition;
};
// Chunks hold about `scratch_elems` elements of working set, but at least
// `min_rows` rows (the weight-gradient products over a chunk need enough rows
// to amortise reading and writing the gradient), unless a batch that would
// make fewer chunks than it may have partitions is cut into smaller ones of
// at least `min_chunk_work` multiply-adds each (of the forward, or when
// `training` of the backward) and 32 rows (0: no such split);
// `max_partitions` bounds the number of partial gradient buffers, whose size
// depends on the plan.
BatchPlan make_batch_plan(const Dims& dims, Plan plan, int64_t scratch_elems,
                          int64_t min_rows, int64_t max_partitions, int64_t min_chunk_work,
                          bool training);


}  // namespace torchext
