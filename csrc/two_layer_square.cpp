// Operator schemas, the shared argument checks and batch plan, and the Meta
// kernels (shape inference for torch.compile / torch.export / FakeTensor).
#include "two_layer_square.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
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
  check_like_z(grad, "grad", z);
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
  auto prep = [cdt](const at::Tensor& t) { return t.to(cdt).contiguous(); };
  ComputeInputs in;
  in.z = prep(z.reshape({dims.N, dims.d}));
  in.W = prep(W);
  in.V = prep(V);
  in.B = prep(B);
  in.a = prep(A.reshape({dims.ell}));
  return in;
}

at::Tensor grad_to_compute(const Dims& dims, const at::Tensor& grad) {
  return grad.reshape({dims.N}).to(compute_dtype(grad.scalar_type())).contiguous();
}

BatchPlan make_batch_plan(const Dims& dims, int64_t scratch_elems,
                          int64_t min_rows, int64_t max_partitions) {
  // Partial weight gradients of all partitions together stay under this
  // many elements, so wide layers get fewer partitions.
  constexpr int64_t kPartialBudget = int64_t{1} << 24;
  const int64_t per_row = 2 * (dims.k + dims.m + dims.ell) + dims.d + 1;
  int64_t rows = std::max<int64_t>(min_rows, scratch_elems / per_row);
  int64_t chunk_rows = 1;
  while (chunk_rows * 2 <= rows) chunk_rows *= 2;  // power of two: stable tiling

  BatchPlan plan;
  plan.chunk_rows = chunk_rows;
  plan.num_chunks = (dims.N + chunk_rows - 1) / chunk_rows;
  const int64_t weight_elems =
      dims.k * dims.d + dims.m * dims.k + dims.ell * dims.m + dims.ell + 1;
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

GradBuffers allocate_grad_buffers(const Dims& dims, const ComputeInputs& in,
                                  const OutputMask& mask) {
  auto opts = in.z.options();
  GradBuffers g;
  if (mask[kZ]) g.acc[kZ] = at::empty({dims.N, dims.d}, opts);
  if (mask[kW]) g.acc[kW] = at::zeros({dims.k, dims.d}, opts);
  if (mask[kV]) g.acc[kV] = at::zeros({dims.m, dims.k}, opts);
  if (mask[kB]) g.acc[kB] = at::zeros({dims.ell, dims.m}, opts);
  if (mask[kA]) g.acc[kA] = at::zeros({dims.ell}, opts);
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
    out[i] = buffers.acc[i].view(like.sizes()).to(like.scalar_type());
  }
  return out;
}

at::Tensor finish_forward(const Dims& dims, at::Tensor f_acc, const at::Tensor& z) {
  return f_acc.view(dims.batch_shape).to(z.scalar_type());
}

BackwardResult to_tuple(std::array<std::optional<at::Tensor>, kNumInputs>&& g) {
  return {std::move(g[0]), std::move(g[1]), std::move(g[2]), std::move(g[3]),
          std::move(g[4])};
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

}  // namespace

TORCH_LIBRARY(torchext, m) {
  m.def(
      "two_layer_square(Tensor z, Tensor W, Tensor V, Tensor B, Tensor A) "
      "-> Tensor");
  m.def(
      "two_layer_square_backward(Tensor grad, Tensor z, Tensor W, Tensor V, "
      "Tensor B, Tensor A, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
}

TORCH_LIBRARY_IMPL(torchext, Meta, m) {
  m.impl("two_layer_square", &two_layer_square_meta);
  m.impl("two_layer_square_backward", &two_layer_square_backward_meta);
}

}  // namespace torchext
