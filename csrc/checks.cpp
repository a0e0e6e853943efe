#include "checks.h"

#include "buffers.h"

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace torchext {

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

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
         t == at::kBFloat16;
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

void check_dense(const at::Tensor& t, const char* name) {
  // (None reaches a Tensor argument of an op as an undefined tensor)
  TORCH_CHECK_TYPE(t.defined(), kOp, ": ", name, " must be a tensor; got None");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided && !t.is_nested(), kOp, ": ", name,
                   " must be a dense (strided) tensor; got ",
                   t.is_nested() ? std::string("a nested tensor")
                                 : "layout " + c10::str(t.layout()));
}

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

void check_plan_name(c10::string_view name) {
  TORCH_CHECK_VALUE(name == "auto" || name == "direct" || name == "folded" ||
                        name == "quadratic",
                    kOp, ": plan must be \"auto\", \"direct\", \"folded\" or "
                    "\"quadratic\"; got \"", std::string(name), "\"");
}

}  // namespace torchext
