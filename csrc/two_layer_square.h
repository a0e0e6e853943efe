// Shared contract of the torchext::two_layer_square operators: argument
// validation (one copy, used by the CPU, CUDA and Meta kernels), the problem
// sizes, the way inputs are brought to the compute dtype, and the batch
// partition that makes every reduction over samples bitwise reproducible.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace torchext {

// Order of the differentiable inputs; also the order of output_mask and of
// the backward op's results.
enum InputIndex : int { kZ = 0, kW = 1, kV = 2, kB = 3, kA = 4, kNumInputs = 5 };
using OutputMask = std::array<bool, kNumInputs>;

// Sizes of one call. SymInt so the Meta kernels (torch.compile, export with
// dynamic shapes) run the very same checks as the real kernels.
struct SymDims {
  c10::SymInt N, d, k, m, ell;
  std::vector<c10::SymInt> batch_shape;  // z.shape[:-1]
};

struct Dims {
  int64_t N, d, k, m, ell;
  std::vector<int64_t> batch_shape;
};

// Validates (z, W, V, B, A). Raises ValueError (shape), TypeError (dtype) or
// RuntimeError (device); every message names the argument and the expected
// shape in terms of d, k, m, ell.
SymDims check_forward_args(const at::Tensor& z, const at::Tensor& W,
                           const at::Tensor& V, const at::Tensor& B,
                           const at::Tensor& A);

// As above, plus the incoming gradient: shape z.shape[:-1], dtype and device of z.
SymDims check_backward_args(const at::Tensor& grad, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V,
                            const at::Tensor& B, const at::Tensor& A);

Dims concrete(const SymDims& dims);

// Whether a training forward keeps r and q for the backward. Saving costs
// about 64·k per sample in memory traffic (written, read back, fresh pages);
// recomputing them chunk by chunk in the backward costs about k·(d + k):
// narrow layers recompute. Depends on d and k only, never on N, so a batch
// size that changes under torch.compile never changes the outputs' shapes.
template <typename Int>
bool keeps_saved(const Int& d, const Int& k) {
  return d + k >= 64;
}


// Dtype the kernels compute and accumulate in: float32 for the half types,
// otherwise the input dtype.
at::ScalarType compute_dtype(at::ScalarType input_dtype);

// The inputs as contiguous compute-dtype tensors: z as (N, d), a = A as (ell,).
// Views of the caller's tensors when they already qualify (no copy).
struct ComputeInputs {
  at::Tensor z, W, V, B, a;
  at::ScalarType input_dtype;  // the caller's dtype (half types: z .. a are float32 copies)
};
ComputeInputs to_compute_inputs(const Dims& dims, const at::Tensor& z,
                                const at::Tensor& W, const at::Tensor& V,
                                const at::Tensor& B, const at::Tensor& A);

// Incoming gradient as an (N,) compute-dtype tensor with stride 1, or 0: the
// broadcast scalar that `.sum()` and `.mean()` hand back is passed on as it
// is (kernels read g[i * grad_stride(g)]) rather than materialised.
at::Tensor grad_to_compute(const Dims& dims, const at::Tensor& grad);
// 1, or 0 for a broadcast gradient (and for N <= 1, where it does not matter).
inline int64_t grad_stride(const at::Tensor& g) { return g.size(0) > 1 ? g.stride(0) : 0; }

enum class Plan;  // see below

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
// to amortise reading and writing the gradient); `max_partitions` bounds the
// number of partial gradient buffers, whose size depends on the plan.
BatchPlan make_batch_plan(const Dims& dims, Plan plan, int64_t scratch_elems,
                          int64_t min_rows, int64_t max_partitions);

// Every buffer a kernel writes before reading it (outputs, gradient buffers,
// partials, Grams, scratch; of a symmetric Gram partial, the part the kernels
// read) comes from here: uninitialised, for speed,
// or NaN-filled while tests ask for it (the test-only op
// _poison_uninitialized), so that an element no kernel wrote shows as NaN
// whatever the allocator hands out.
at::Tensor uninitialized(at::IntArrayRef shape, const at::TensorOptions& options);
// Whether tests poison now (for buffers that do not come from `uninitialized`).
bool poisoning_uninitialized();

// Allocates the requested gradients in the compute dtype, uninitialised: a
// backward kernel writes every gradient it is asked for (one that accumulates
// writes or zeroes it first). An empty batch runs no kernel and gets zeros.
struct GradBuffers {
  std::array<at::Tensor, kNumInputs> acc;  // undefined where not requested
};
GradBuffers allocate_grad_buffers(const Dims& dims, const ComputeInputs& in,
                                  const OutputMask& mask);

// Turns compute-dtype results into the op's outputs: each gradient in its
// input's shape and dtype, contiguous, never aliasing an input.
std::array<std::optional<at::Tensor>, kNumInputs> finish_grads(
    const Dims& dims, GradBuffers&& buffers, const at::Tensor& z,
    const at::Tensor& W, const at::Tensor& V, const at::Tensor& B,
    const at::Tensor& A);

at::Tensor finish_forward(const Dims& dims, at::Tensor f_acc, const at::Tensor& z);

using BackwardResult =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
               std::optional<at::Tensor>, std::optional<at::Tensor>,
               std::optional<at::Tensor>>;
BackwardResult to_tuple(std::array<std::optional<at::Tensor>, kNumInputs>&& g);

// ---------------------------------------------------------------------------
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
// Raises ValueError unless name is "auto", "direct", "folded" or "quadratic".
void check_plan_name(c10::string_view name);

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
// backward's batch), compute dtype, z's device; ignored otherwise.
void check_saved(const Dims& dims, const at::Tensor& z, const SavedState& state,
                 const at::Tensor& r, const at::Tensor& q);

// The per-call products of the folded and quadratic plans, in the compute
// dtype on the inputs' device: M = B V (ell, k) and, for quadratic,
// Q = Mᵀ diag(a) M (k, k). Undefined where the plan does not use them.
struct Head {
  at::Tensor M, Q;
};

// The matrix product the per-call algebra below runs on: a backend passes its
// own where at::mm falls short of its guarantees (the CPU backend: MKL's
// small-matrix products round differently with the thread count, and results
// must not depend on it).
using Matmul = at::Tensor (*)(const at::Tensor& a, const at::Tensor& b);
at::Tensor aten_mm(const at::Tensor& a, const at::Tensor& b);

Head fold_head(const ComputeInputs& in, Plan plan, Matmul mm = &aten_mm);

// dV, dB and dA from the Gram G = Σ_n g_n r_n r_nᵀ (k, k), stored in the
// buffers (replacing them): with D = 2 diag(a) M G, dV = Bᵀ D, dB = D Vᵀ,
// dA_i = (M G Mᵀ)_ii.
void add_grads_from_gram(const ComputeInputs& in, const at::Tensor& M,
                         const at::Tensor& G, const OutputMask& mask,
                         GradBuffers& bufs, Matmul mm = &aten_mm);

// Outputs of the internal forward op: f (N,) and, when saving for backward,
// r = relu(W z) and q (each (N, k), compute dtype; (0, k) otherwise; for the
// direct plan q holds y or zeros, see Plan).
struct ForwardOutputs {
  at::Tensor f, r, q;
};
// f, r, q and the state (see SavedState).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The device-generic implementation in ATen ops (two_layer_square_aten.cpp):
// what the CUDA backend runs around its fused kernels, and what the
// `_..._aten` test ops run on the CPU, so CPU CI checks the CUDA algorithm.
// backward_aten zeroes the weight-gradient buffers it accumulates into.
void forward_aten(const Dims& dims, const ComputeInputs& in, Plan plan,
                  int64_t chunk_rows, ForwardOutputs& out);
// r and q undefined: the backward recomputes them chunk by chunk.
void backward_aten(const Dims& dims, const ComputeInputs& in,
                   const at::Tensor& g, const at::Tensor& r,
                   const at::Tensor& q, Plan plan, const OutputMask& mask,
                   int64_t chunk_rows, GradBuffers& bufs);

// The frames every backend shares; a backend writes only its two kernels and
// register_kernels derives the four op entry points from them.
//
// Forward kernel: void(const Dims&, const ComputeInputs&, Plan, ForwardOutputs&).
// run_forward checks, brings the inputs to the compute dtype, resolves the
// plan (once per call: the backward reads it from the state), allocates the
// outputs, runs the kernel on a non-empty batch and casts f back to the
// input dtype.
template <auto Kernel>
ForwardResult run_forward(const at::Tensor& z, const at::Tensor& W, const at::Tensor& V,
                          const at::Tensor& B, const at::Tensor& A,
                          c10::string_view plan_name, bool save, bool training) {
  const Dims dims = concrete(check_forward_args(z, W, V, B, A));
  check_plan_name(plan_name);
  const ComputeInputs in = to_compute_inputs(dims, z, W, V, B, A);
  const SavedState state = forward_state(dims.N, dims.d, dims.k, dims.m, dims.ell, plan_name,
                                         save, save && keeps_saved(dims.d, dims.k));
  const Plan plan = save ? state.resolved(dims) : resolve_plan(dims, plan_name, training);
  const int64_t saved_rows = state.saved ? dims.N : 0;
  ForwardOutputs out{uninitialized({dims.N}, in.z.options()),
                     uninitialized({saved_rows, dims.k}, in.z.options()),
                     uninitialized({saved_rows, dims.k}, in.z.options())};
  if (dims.N > 0) Kernel(dims, in, plan, out);
  return {finish_forward(dims, std::move(out.f), z), std::move(out.r),
          std::move(out.q), make_state(state, z.options())};
}

// The internal forward op: a training forward (save) resolves "auto" by the
// training cost, an inference one by the forward's.
template <auto Kernel>
ForwardResult internal_forward(const at::Tensor& z, const at::Tensor& W,
                               const at::Tensor& V, const at::Tensor& B,
                               const at::Tensor& A, c10::string_view plan_name,
                               bool save) {
  return run_forward<Kernel>(z, W, V, B, A, plan_name, save, /*training=*/save);
}

// The public forward saves nothing, and its backward (the public backward op)
// recomputes r and q: both resolve "auto" by the training cost, so that a
// call's f and its gradients come from one plan.
template <auto Kernel>
at::Tensor public_forward(const at::Tensor& z, const at::Tensor& W,
                          const at::Tensor& V, const at::Tensor& B,
                          const at::Tensor& A) {
  return std::get<0>(run_forward<Kernel>(z, W, V, B, A, "auto", false, /*training=*/true));
}

// Backward kernel: void(const Dims&, const ComputeInputs&, const at::Tensor& g,
// const at::Tensor& r, const at::Tensor& q, Plan, const OutputMask&, GradBuffers&),
// with g as grad_to_compute gives it (stride 1 or 0), r and q contiguous, or
// undefined when they were not saved (the kernel recomputes them chunk by
// chunk). run_backward runs it on a non-empty batch with some gradient
// requested; it writes every requested gradient (the buffers come
// uninitialised, see allocate_grad_buffers).
template <auto Kernel>
BackwardResult run_backward(const Dims& dims, const at::Tensor& grad, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V, const at::Tensor& B,
                            const at::Tensor& A, const at::Tensor& r, const at::Tensor& q,
                            Plan plan, const OutputMask& mask) {
  const ComputeInputs in = to_compute_inputs(dims, z, W, V, B, A);
  GradBuffers bufs = allocate_grad_buffers(dims, in, mask);
  bool any = false;
  for (bool b : mask) any = any || b;
  if (dims.N > 0 && any) {
    Kernel(dims, in, grad_to_compute(dims, grad), r.defined() ? r.contiguous() : r,
           q.defined() ? q.contiguous() : q, plan, mask, bufs);
  }
  return to_tuple(finish_grads(dims, std::move(bufs), z, W, V, B, A));
}

// The internal backward op: the plan and the saved r and q its forward left.
template <auto Kernel>
BackwardResult internal_backward(const at::Tensor& grad, const at::Tensor& z,
                                 const at::Tensor& W, const at::Tensor& V,
                                 const at::Tensor& B, const at::Tensor& A,
                                 const at::Tensor& r, const at::Tensor& q,
                                 const at::Tensor& state, std::array<bool, 5> mask) {
  const Dims dims = concrete(check_backward_args(grad, z, W, V, B, A));
  const SavedState saved = read_state(state);
  check_saved(dims, z, saved, r, q);
  return run_backward<Kernel>(dims, grad, z, W, V, B, A, saved.saved ? r : at::Tensor(),
                              saved.saved ? q : at::Tensor(), saved.resolved(dims), mask);
}

// The public backward op recomputes r and q, with the plan public_forward ran.
template <auto Kernel>
BackwardResult public_backward(const at::Tensor& grad, const at::Tensor& z,
                               const at::Tensor& W, const at::Tensor& V,
                               const at::Tensor& B, const at::Tensor& A,
                               std::array<bool, 5> mask) {
  const Dims dims = concrete(check_backward_args(grad, z, W, V, B, A));
  return run_backward<Kernel>(dims, grad, z, W, V, B, A, at::Tensor(), at::Tensor(),
                              resolve_plan(dims, "auto", /*training=*/true), mask);
}

template <auto ForwardKernel, auto BackwardKernel>
void register_kernels(torch::Library& m) {
  m.impl("two_layer_square", &public_forward<ForwardKernel>);
  m.impl("two_layer_square_backward", &public_backward<BackwardKernel>);
  m.impl("_two_layer_square_forward", &internal_forward<ForwardKernel>);
  m.impl("_two_layer_square_backward", &internal_backward<BackwardKernel>);
}

}  // namespace torchext
