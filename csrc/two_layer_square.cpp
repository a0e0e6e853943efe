// Operator schemas, the shared argument checks and batch plan, and the Meta
// kernels (shape inference for torch.compile / torch.export / FakeTensor).
#include "two_layer_square.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <sstream>
#include <string>

namespace torchext {
namespace {

constexpr const char* kOp = "two_layer_square";

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(c10::SymIntArrayRef sizes) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    os << (i ? ", " : "") << sizes[i];
  }
  os << (sizes.size() == 1 ? ",)" : ")");
  return os.str();
}

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, kOp, ": ", name,
                   " must be a dense (strided) tensor; got layout ",
                   t.layout());
}

void check_like_z(const at::Tensor& t, const char* name, const at::Tensor& z) {
  check_dense(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == z.scalar_type(), kOp, ": ", name,
                   " must have dtype ", dtype_name(z.scalar_type()),
                   " (the dtype of z); got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == z.device(), kOp, ": ", name,
              " must be on the same device as z (", z.device(), "); got ",
              t.device());
}

}  // namespace

SymDims check_forward_args(const at::Tensor& z, const at::Tensor& W,
                           const at::Tensor& V, const at::Tensor& B,
                           const at::Tensor& A) {
  check_dense(z, "z");
  TORCH_CHECK_TYPE(is_supported_dtype(z.scalar_type()), kOp,
                   ": z must be a floating-point tensor (torch.float16, "
                   "torch.bfloat16, torch.float32 or torch.float64); got ",
                   dtype_name(z.scalar_type()));
  TORCH_CHECK_VALUE(z.dim() >= 1, kOp,
                    ": z must have shape (..., d) with at least one "
                    "dimension; got a 0-dim tensor");
  check_like_z(W, "W", z);
  check_like_z(V, "V", z);
  check_like_z(B, "B", z);
  check_like_z(A, "A", z);

  SymDims dims;
  auto zs = z.sym_sizes();
  dims.d = zs.back();
  dims.batch_shape.assign(zs.begin(), zs.end() - 1);
  dims.N = c10::SymInt(1);
  for (const auto& s : dims.batch_shape) dims.N = dims.N * s;

  TORCH_CHECK_VALUE(W.dim() == 2 && W.sym_size(1) == dims.d, kOp,
                    ": W must have shape (k, d) = (k, ", dims.d,
                    ") with d = z.shape[-1]; got ", shape_str(W.sym_sizes()));
  dims.k = W.sym_size(0);
  TORCH_CHECK_VALUE(V.dim() == 2 && V.sym_size(1) == dims.k, kOp,
                    ": V must have shape (m, k) = (m, ", dims.k,
                    ") with k = W.shape[0]; got ", shape_str(V.sym_sizes()));
  dims.m = V.sym_size(0);
  TORCH_CHECK_VALUE(B.dim() == 2 && B.sym_size(1) == dims.m, kOp,
                    ": B must have shape (ell, m) = (ell, ", dims.m,
                    ") with m = V.shape[0]; got ", shape_str(B.sym_sizes()));
  dims.ell = B.sym_size(0);
  const bool a_ok = (A.dim() == 1 && A.sym_size(0) == dims.ell) ||
                    (A.dim() == 2 && A.sym_size(0) == 1 &&
                     A.sym_size(1) == dims.ell);
  TORCH_CHECK_VALUE(a_ok, kOp, ": A must have shape (1, ell) = (1, ",
                    dims.ell, ") or (ell,) = (", dims.ell,
                    ",) with ell = B.shape[0]; got ",
                    shape_str(A.sym_sizes()));
  return dims;
}

SymDims check_backward_args(const at::Tensor& grad, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V,
                            const at::Tensor& B, const at::Tensor& A) {
  SymDims dims = check_forward_args(z, W, V, B, A);
  check_dense(grad, "grad");
  // f of half-precision inputs may come back as float32 (autocast returns it
  // so), hence its gradient may be either dtype.
  const auto gdt = grad.scalar_type();
  TORCH_CHECK_TYPE(gdt == z.scalar_type() || gdt == compute_dtype(z.scalar_type()), kOp,
                   ": grad must have dtype ", dtype_name(z.scalar_type()),
                   " (the dtype of z)",
                   compute_dtype(z.scalar_type()) != z.scalar_type()
                       ? " or " + dtype_name(compute_dtype(z.scalar_type()))
                       : std::string(),
                   "; got ", dtype_name(gdt));
  TORCH_CHECK(grad.device() == z.device(), kOp,
              ": grad must be on the same device as z (", z.device(), "); got ",
              grad.device());
  auto gs = grad.sym_sizes();
  bool same = gs.size() == dims.batch_shape.size();
  for (size_t i = 0; same && i < gs.size(); ++i) {
    same = gs[i] == dims.batch_shape[i];
  }
  TORCH_CHECK_VALUE(same, kOp,
                    ": grad must have the shape of the output, z.shape[:-1] = ",
                    shape_str(dims.batch_shape), "; got ", shape_str(gs));
  return dims;
}

Dims concrete(const SymDims& s) {
  Dims d;
  d.N = s.N.expect_int();
  d.d = s.d.expect_int();
  d.k = s.k.expect_int();
  d.m = s.m.expect_int();
  d.ell = s.ell.expect_int();
  d.batch_shape.reserve(s.batch_shape.size());
  for (const auto& b : s.batch_shape) d.batch_shape.push_back(b.expect_int());
  return d;
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

ComputeInputs to_compute_inputs(const Dims& dims, const at::Tensor& z,
                                const at::Tensor& W, const at::Tensor& V,
                                const at::Tensor& B, const at::Tensor& A) {
  const auto cdt = compute_dtype(z.scalar_type());
  // Inputs that already qualify pass through without a dispatcher call (each
  // reshape or to() is one, and at the seed sizes they add up).
  auto prep = [cdt](const at::Tensor& t) {
    return t.scalar_type() == cdt && t.is_contiguous() ? t : t.to(cdt).contiguous();
  };
  ComputeInputs in;
  in.input_dtype = z.scalar_type();
  in.z = prep(z.dim() == 2 ? z : z.reshape({dims.N, dims.d}));
  in.W = prep(W);
  in.V = prep(V);
  in.B = prep(B);
  in.a = prep(A.dim() == 1 ? A : A.reshape({dims.ell}));
  return in;
}

at::Tensor grad_to_compute(const Dims& dims, const at::Tensor& grad) {
  const auto cdt = compute_dtype(grad.scalar_type());
  at::Tensor g = grad.dim() == 1 ? grad : grad.reshape({dims.N});
  if (g.scalar_type() != cdt) g = g.to(cdt);
  return g.stride(0) == 0 || g.is_contiguous() ? g : g.contiguous();
}

BatchPlan make_batch_plan(const Dims& dims, Plan plan_kind, int64_t scratch_elems,
                          int64_t min_rows, int64_t max_partitions) {
  // Partial weight gradients of all partitions together stay under this
  // many elements (beyond it, one), so wide layers get fewer partitions.
  constexpr int64_t kPartialBudget = int64_t{1} << 24;
  const int64_t per_row = 2 * (dims.k + dims.m + dims.ell) + dims.d + 1;
  int64_t rows = std::max<int64_t>(min_rows, scratch_elems / per_row);
  int64_t chunk_rows = 1;
  while (chunk_rows * 2 <= rows) chunk_rows *= 2;  // power of two: stable tiling

  BatchPlan plan;
  plan.chunk_rows = chunk_rows;
  plan.num_chunks = (dims.N + chunk_rows - 1) / chunk_rows;
  // A partition holds dW and either the direct chain's dV, dB, dA or the
  // folded and quadratic plans' k×k Gram.
  const int64_t weight_elems =
      1 + dims.k * dims.d + (plan_kind == Plan::kDirect
                                 ? dims.m * dims.k + dims.ell * dims.m + dims.ell
                                 : dims.k * dims.k);
  int64_t parts = std::min<int64_t>(plan.num_chunks, max_partitions);
  parts = std::min<int64_t>(parts, std::max<int64_t>(1, kPartialBudget / weight_elems));
  parts = std::max<int64_t>(parts, 1);
  plan.chunks_per_partition =
      std::max<int64_t>(1, (plan.num_chunks + parts - 1) / parts);
  plan.partitions = plan.num_chunks == 0
                        ? 0
                        : (plan.num_chunks + plan.chunks_per_partition - 1) /
                              plan.chunks_per_partition;
  return plan;
}

namespace {
std::atomic<bool> poison_uninitialized{false};

// Test only; the sample lets a test see that the switch took effect.
at::Tensor set_poison_uninitialized(bool enabled) {
  poison_uninitialized.store(enabled);
  return uninitialized({16}, at::TensorOptions().dtype(at::kFloat));
}
}  // namespace

bool poisoning_uninitialized() { return poison_uninitialized.load(std::memory_order_relaxed); }

at::Tensor uninitialized(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (poisoning_uninitialized() && at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return t;
}

GradBuffers allocate_grad_buffers(const Dims& dims, const ComputeInputs& in,
                                  const OutputMask& mask) {
  auto opts = in.z.options();
  auto make = [&](at::IntArrayRef shape) {
    return dims.N == 0 ? at::zeros(shape, opts) : uninitialized(shape, opts);
  };
  GradBuffers g;
  if (mask[kZ]) g.acc[kZ] = uninitialized({dims.N, dims.d}, opts);
  if (mask[kW]) g.acc[kW] = make({dims.k, dims.d});
  if (mask[kV]) g.acc[kV] = make({dims.m, dims.k});
  if (mask[kB]) g.acc[kB] = make({dims.ell, dims.m});
  if (mask[kA]) g.acc[kA] = make({dims.ell});
  return g;
}

std::array<std::optional<at::Tensor>, kNumInputs> finish_grads(
    const Dims& dims, GradBuffers&& buffers, const at::Tensor& z,
    const at::Tensor& W, const at::Tensor& V, const at::Tensor& B,
    const at::Tensor& A) {
  const at::Tensor* inputs[kNumInputs] = {&z, &W, &V, &B, &A};
  std::array<std::optional<at::Tensor>, kNumInputs> out;
  for (int i = 0; i < kNumInputs; ++i) {
    if (!buffers.acc[i].defined()) continue;
    const at::Tensor& like = *inputs[i];
    at::Tensor& g = buffers.acc[i];
    if (g.sizes() != like.sizes()) g = g.view(like.sizes());
    out[i] = g.scalar_type() == like.scalar_type() ? std::move(g) : g.to(like.scalar_type());
  }
  return out;
}

at::Tensor finish_forward(const Dims& dims, at::Tensor f_acc, const at::Tensor& z) {
  if (f_acc.sizes() != at::IntArrayRef(dims.batch_shape)) f_acc = f_acc.view(dims.batch_shape);
  return f_acc.scalar_type() == z.scalar_type() ? f_acc : f_acc.to(z.scalar_type());
}

BackwardResult to_tuple(std::array<std::optional<at::Tensor>, kNumInputs>&& g) {
  return {std::move(g[0]), std::move(g[1]), std::move(g[2]), std::move(g[3]),
          std::move(g[4])};
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
  return {size(1), size(2) == 1};
}

void check_saved(const Dims& dims, const at::Tensor& z, const SavedState& state,
                 const at::Tensor& r, const at::Tensor& q) {
  if (!state.saved) return;
  const auto cdt = compute_dtype(z.scalar_type());
  for (const auto* t : {&r, &q}) {
    const char* name = t == &r ? "r" : "q";
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == dims.N && t->size(1) == dims.k,
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

const char* plan_name(Plan plan) {
  switch (plan) {
    case Plan::kDirect: return "direct";
    case Plan::kFolded: return "folded";
    case Plan::kQuadratic: return "quadratic";
  }
  return "?";
}

void check_plan_name(c10::string_view name) {
  TORCH_CHECK_VALUE(name == "auto" || name == "direct" || name == "folded" ||
                        name == "quadratic",
                    kOp, ": plan must be \"auto\", \"direct\", \"folded\" or "
                    "\"quadratic\"; got \"", std::string(name), "\"");
}

PlanCost plan_cost(int64_t d_, int64_t k_, int64_t m_, int64_t ell_, Plan plan,
                   bool training) {
  const double d = double(d_), k = double(k_), m = double(m_), ell = double(ell_);
  // Per-call products: M = B V, Q = Mᵀ diag(a) M, and in the backward the
  // products with the Gram (M G, Bᵀ D, D Vᵀ). They also cost a fixed handful
  // of extra op launches (about a million multiply-adds' worth of time on a
  // CPU core), which decides the smallest problems in favour of direct.
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

at::Tensor aten_mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }

Head fold_head(const ComputeInputs& in, Plan plan, Matmul mm) {
  Head head;
  if (plan == Plan::kDirect) return head;
  head.M = mm(in.B, in.V);
  if (plan == Plan::kQuadratic) {
    head.Q = mm((head.M * in.a.unsqueeze(1)).t(), head.M);
  }
  return head;
}

void add_grads_from_gram(const ComputeInputs& in, const at::Tensor& M,
                         const at::Tensor& G, const OutputMask& mask,
                         GradBuffers& bufs, Matmul mm) {
  if (!(mask[kV] || mask[kB] || mask[kA])) return;
  const at::Tensor MG = mm(M, G);
  if (mask[kV] || mask[kB]) {
    const at::Tensor D = MG * (2 * in.a).unsqueeze(1);
    if (mask[kV]) bufs.acc[kV] = mm(in.B.t(), D);
    if (mask[kB]) bufs.acc[kB] = mm(D, in.V.t());
  }
  if (mask[kA]) bufs.acc[kA] = (MG * M).sum(1);
}

namespace {

at::Tensor two_layer_square_meta(const at::Tensor& z, const at::Tensor& W,
                                 const at::Tensor& V, const at::Tensor& B,
                                 const at::Tensor& A) {
  SymDims dims = check_forward_args(z, W, V, B, A);
  return at::empty_symint(dims.batch_shape, z.options());
}

BackwardResult two_layer_square_backward_meta(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& W,
    const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
    std::array<bool, 5> output_mask) {
  check_backward_args(grad, z, W, V, B, A);
  const at::Tensor* inputs[kNumInputs] = {&z, &W, &V, &B, &A};
  std::array<std::optional<at::Tensor>, kNumInputs> out;
  for (int i = 0; i < kNumInputs; ++i) {
    if (output_mask[i]) {
      out[i] = at::empty_symint(inputs[i]->sym_sizes(), inputs[i]->options());
    }
  }
  return to_tuple(std::move(out));
}

ForwardResult forward_internal_meta(const at::Tensor& z, const at::Tensor& W,
                                    const at::Tensor& V, const at::Tensor& B,
                                    const at::Tensor& A, c10::string_view plan,
                                    bool save_for_backward) {
  SymDims dims = check_forward_args(z, W, V, B, A);
  check_plan_name(plan);
  const auto opts = z.options().dtype(compute_dtype(z.scalar_type()));
  const bool saved = save_for_backward && keeps_saved(dims.d, dims.k);
  const c10::SymInt rows = saved ? dims.N : c10::SymInt(0);
  // A training forward's state holds the resolved plan: "auto" specialises
  // the weights' sizes and guards on the range of N where the plan holds.
  auto size = [](const c10::SymInt& s) { return s.guard_int(__FILE__, __LINE__); };
  const bool resolve = save_for_backward && !forced_plan(plan);
  TORCH_CHECK(!resolve || dims.N.has_hint(), kOp,
              ": a batch size that depends on data (torch.compile with dynamic output "
              "shapes) needs a forced plan when gradients are wanted: pass plan=\"direct\", "
              "\"folded\" or \"quadratic\"");
  const SavedState state =
      resolve ? forward_state(dims.N, size(dims.d), size(dims.k), size(dims.m), size(dims.ell),
                              plan, save_for_backward, saved)
              : forward_state(int64_t{0}, 0, 0, 0, 0, plan, save_for_backward, saved);
  return {at::empty_symint(dims.batch_shape, z.options()),
          at::empty_symint({rows, dims.k}, opts),
          at::empty_symint({rows, dims.k}, opts),
          make_state(state, z.options())};
}

BackwardResult backward_internal_meta(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& W,
    const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
    const at::Tensor& r, const at::Tensor& q, const at::Tensor& state,
    std::array<bool, 5> output_mask) {
  read_state(state);
  return two_layer_square_backward_meta(grad, z, W, V, B, A, output_mask);
}

// Which plan a call with these sizes runs (for the benchmark record and tests).
std::string plan_for_sizes(int64_t N, int64_t d, int64_t k, int64_t m,
                           int64_t ell, c10::string_view plan, bool training) {
  check_plan_name(plan);
  return plan_name(resolve_plan(N, d, k, m, ell, plan, training));
}

}  // namespace

TORCH_LIBRARY(torchext, m) {
  m.def(
      "two_layer_square(Tensor z, Tensor W, Tensor V, Tensor B, Tensor A) "
      "-> Tensor");
  m.def(
      "two_layer_square_backward(Tensor grad, Tensor z, Tensor W, Tensor V, "
      "Tensor B, Tensor A, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // Internal: the forward that also returns what the backward needs (r and
  // q, see Plan; (0, k) when keeps_saved says to recompute them, or when not
  // saving) and the state (see SavedState: the plan it ran), and the backward
  // that consumes them. A training forward (save_for_backward) resolves
  // "auto" by the training cost.
  m.def(
      "_two_layer_square_forward(Tensor z, Tensor W, Tensor V, Tensor B, "
      "Tensor A, str plan=\"auto\", bool save_for_backward=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_two_layer_square_backward(Tensor grad, Tensor z, Tensor W, Tensor V, "
      "Tensor B, Tensor A, Tensor r, Tensor q, Tensor state, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  m.def(
      "_plan(int N, int d, int k, int m, int ell, str plan=\"auto\", "
      "bool training=True) -> str",
      &plan_for_sizes);
  // Test-only: the device-generic ATen implementation that the CUDA backend
  // runs, registered for CPU tensors so that CI without a GPU checks it.
  m.def(
      "_two_layer_square_forward_aten(Tensor z, Tensor W, Tensor V, Tensor B, "
      "Tensor A, str plan=\"auto\", bool save_for_backward=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_two_layer_square_backward_aten(Tensor grad, Tensor z, Tensor W, "
      "Tensor V, Tensor B, Tensor A, Tensor r, Tensor q, Tensor state, "
      "bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // Test and benchmark only (CPU): the matrix product the CPU kernels run on
  // (the AVX-512 kernel where it runs, else BLAS), in the fixed row blocks of
  // the head's products.
  m.def("_cpu_matmul(Tensor a, Tensor b) -> Tensor");
  // Test only: NaN-fill every buffer from `uninitialized` from now on (or
  // stop); returns a buffer from `uninitialized` made after the switch.
  m.def("_poison_uninitialized(bool enabled) -> Tensor", &set_poison_uninitialized);
}

TORCH_LIBRARY_IMPL(torchext, Meta, m) {
  m.impl("two_layer_square", &two_layer_square_meta);
  m.impl("two_layer_square_backward", &two_layer_square_backward_meta);
  m.impl("_two_layer_square_forward", &forward_internal_meta);
  m.impl("_two_layer_square_backward", &backward_internal_meta);
  m.impl("_two_layer_square_forward_aten", &forward_internal_meta);
  m.impl("_two_layer_square_backward_aten", &backward_internal_meta);
}

}  // namespace torchext
