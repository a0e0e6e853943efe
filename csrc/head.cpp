#include "head.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>

namespace torchext {

at::Tensor aten_mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }

Head fold_head(const ComputeInputs& in, Plan plan, Matmul mm) {
  Head head;
  if (plan == Plan::kDirect) return head;
  head.M = mm(in.B, in.V);
  if (plan == Plan::kQuadratic) {
    head.Q = mm(head.M.mul(in.a.unsqueeze(1)).t(), head.M);
  }
  return head;
}

namespace {
// 2a as a column (ell, 1), to scale the rows of M or M G: a + a is 2a
// exactly, in one op (a scalar factor adds a conversion of it).
at::Tensor twice_a_column(const ComputeInputs& in) { return in.a.add(in.a).unsqueeze(1); }
}  // namespace

GramFactors gram_factors(const ComputeInputs& in, const Head& head, const OutputMask& mask,
                         Matmul mm) {
  GramFactors f;
  if (!(mask[kV] || mask[kB] || mask[kA])) return f;
  const at::Tensor M = head.M.defined() ? head.M : mm(in.B, in.V);
  if (mask[kA]) {
    f.M = M;
  } else {
    f.Ma = M.mul(twice_a_column(in));
  }
  return f;
}

void add_grads_from_gram(const ComputeInputs& in, const GramFactors& factors,
                         const at::Tensor& G, const OutputMask& mask, GradBuffers& bufs,
                         Matmul mm) {
  at::Tensor D;
  if (mask[kA]) {  // M G, which dA needs, gives D too
    const at::Tensor MG = mm(factors.M, G);
    // dA_i = Σ_j (M G)_ij M_ij as a product with a ones column, whose sum
    // order is fixed: at::sum splits a single long row across threads.
    bufs.acc[kA] = mm(MG.mul(factors.M), at::ones({MG.size(1), 1}, MG.options())).squeeze(1);
    if (mask[kV] || mask[kB]) D = MG.mul(twice_a_column(in));
  } else if (mask[kV] || mask[kB]) {
    D = mm(factors.Ma, G);
  }
  if (mask[kV]) bufs.acc[kV] = mm(in.B.t(), D);
  if (mask[kB]) bufs.acc[kB] = mm(D, in.V.t());
}

}  // namespace torchext
