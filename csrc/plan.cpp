#include "plan.h"

#include "buffers.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

namespace torchext {

const char* plan_name(Plan plan) {
  switch (plan) {
    case Plan::kDirect: return "direct";
    case Plan::kFolded: return "folded";
    case Plan::kQuadratic: return "quadratic";
  }
  return "?";
}

PlanCost plan_cost(int64_t d_, int64_t k_, int64_t m_, int64_t ell_, Plan plan,
                   bool training) {
  const double d = double(d_), k = double(k_), m = double(m_), ell = double(ell_);
  // Per-call products: M = B V, Q = Mᵀ diag(a) M, and in the backward the
  // products with the Gram (Ma G or M G, Bᵀ D, D Vᵀ; see gram_factors). They
  // also cost a fixed handful of extra op launches (about a million
  // multiply-adds' worth of time on a CPU core), which decides the smallest
  // problems in favour of direct.
  const double fold = ell * m * k + (training ? 1e6 : 2.5e5);
  switch (plan) {
    case Plan::kDirect:
      // forward x, u, y; backward runs u, y, Bᵀe, Vᵀ(.) again and forms dV, dW.
      return {0, training ? 2 * k * d + 4 * m * k + 3 * ell * m : k * d + m * k + ell * m};
    case Plan::kFolded:
      return training ? PlanCost{3 * fold + ell * k * k, 2 * k * d + 2 * ell * k + 0.5 * k * k}
                      : PlanCost{fold, k * d + ell * k};
    case Plan::kQuadratic:
      return training ? PlanCost{3 * fold + 2 * ell * k * k, 2 * k * d + 1.5 * k * k}
                      : PlanCost{fold + ell * k * k, k * d + k * k};
  }
  return {0, 0};
}

at::Tensor make_state(const SavedState& state, const at::TensorOptions& z_options) {
  return at::empty({0, state.plan, state.saved ? 1 : 0}, z_options.dtype(at::kByte));
}

SavedState read_state(const at::Tensor& state) {
  const auto s = state.sym_sizes();
  // A state's sizes are categories, not lengths: a symbolic one (the state
  // as a graph input under dynamic shapes) is specialised.
  auto size = [&](size_t i) { return s[i].guard_int(__FILE__, __LINE__); };
  auto is = [&](size_t i, int64_t lo, int64_t hi) { return size(i) >= lo && size(i) <= hi; };
  TORCH_CHECK_VALUE(s.size() == 3 && is(0, 0, 0) && is(1, 0, SavedState::kAuto) && is(2, 0, 1),
                    kOp,
                    ": state must be the fourth output of the forward that saved r and q "
                    "(a tensor of shape (0, plan, saved)); got shape ", shape_str(s));
  // Saved r and q are only valid for the plan that wrote them, which the
  // forward then records: never an unresolved "auto" (see forward_state).
  TORCH_CHECK_VALUE(!(size(1) == SavedState::kAuto && size(2) == 1), kOp,
                    ": state must be the fourth output of the forward that saved r and q; "
                    "got shape ", shape_str(s), ", which says r and q were saved under an "
                    "unresolved plan");
  return {size(1), size(2) == 1};
}

void check_saved(const SymDims& dims, const at::Tensor& z, const SavedState& state,
                 const at::Tensor& r, const at::Tensor& q) {
  if (!state.saved) return;
  const auto cdt = compute_dtype(z.scalar_type());
  for (const auto* t : {&r, &q}) {
    const char* name = t == &r ? "r" : "q";
    TORCH_CHECK_VALUE(t->dim() == 2 && t->sym_size(0) == dims.N && t->sym_size(1) == dims.k,
                      kOp, ": saved ", name, " must have shape (N, k) = (", dims.N,
                      ", ", dims.k, "), as the state says its forward saved it; got ",
                      shape_str(t->sym_sizes()));
    TORCH_CHECK_TYPE(t->scalar_type() == cdt, kOp, ": saved ", name,
                     " must have dtype ", dtype_name(cdt), "; got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK(t->device() == z.device(), kOp, ": saved ", name,
                " must be on the same device as z (", z.device(), "); got ",
                t->device());
  }
}

BatchPlan make_batch_plan(const Dims& dims, Plan plan_kind, int64_t scratch_elems,
                          int64_t min_rows, int64_t max_partitions, int64_t min_chunk_work,
                          bool training) {
  // Partial weight gradients of all partitions together stay under this
  // many elements (beyond it, one), so wide layers get fewer partitions. A
  // partition holds dW and either the direct chain's dV, dB, dA or the
  // folded and quadratic plans' k×k Gram.
  constexpr int64_t kPartialBudget = int64_t{1} << 24;
  const int64_t weight_elems =
      1 + dims.k * dims.d + (plan_kind == Plan::kDirect
                                 ? dims.m * dims.k + dims.ell * dims.m + dims.ell
                                 : dims.k * dims.k);
  const int64_t most_parts =
      std::max<int64_t>(1, std::min<int64_t>(max_partitions, kPartialBudget / weight_elems));

  const int64_t per_row = 2 * (dims.k + dims.m + dims.ell) + dims.d + 1;
  int64_t rows = std::max<int64_t>(min_rows, scratch_elems / per_row);
  int64_t chunk_rows = 1;
  while (chunk_rows * 2 <= rows) chunk_rows *= 2;  // power of two: stable tiling
  // A batch of fewer chunks than it may have partitions (a forward: than
  // max_partitions) is cut finer, while each chunk keeps min_chunk_work
  // multiply-adds of the call (a forward's, or a backward's, not counting a
  // forward it recomputes) to amortise handing it to a thread, so that small
  // batches use several cores.
  const double row_work =
      plan_cost(dims.d, dims.k, dims.m, dims.ell, plan_kind, training).per_sample -
      (training ? plan_cost(dims.d, dims.k, dims.m, dims.ell, plan_kind, false).per_sample : 0);
  const int64_t most_chunks = training ? most_parts : max_partitions;
  constexpr int64_t kMinSplitRows = 32;  // fewer rows stream the weights for too little work
  while (min_chunk_work > 0 && chunk_rows / 2 >= kMinSplitRows &&
         (dims.N + chunk_rows - 1) / chunk_rows < most_chunks &&
         double(chunk_rows / 2) * row_work >= double(min_chunk_work))
    chunk_rows /= 2;

  BatchPlan plan;
  plan.chunk_rows = chunk_rows;
  plan.num_chunks = (dims.N + chunk_rows - 1) / chunk_rows;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(plan.num_chunks, most_parts));
  plan.chunks_per_partition =
      std::max<int64_t>(1, (plan.num_chunks + parts - 1) / parts);
  plan.partitions = plan.num_chunks == 0
                        ? 0
                        : (plan.num_chunks + plan.chunks_per_partition - 1) /
                              plan.chunks_per_partition;
  return plan;
}

}  // namespace torchext
