#include "head.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>

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

GramFactors gram_factors(const ComputeInputs& in, const Head& head, const OutputMask& mask,
                         Matmul mm) {
  GramFactors f;
  if (!(mask[kV] || mask[kB] || mask[kA])) return f;
  const at::Tensor M = head.M.defined() ? head.M : mm(in.B, in.V);
  // a + a is 2a exactly, in one op (a scalar factor adds a conversion of it).
  if (mask[kV] || mask[kB]) f.Ma = M.mul(in.a.add(in.a).unsqueeze(1));
  if (mask[kA]) f.M = M;
  return f;
}

void add_grads_from_gram(const ComputeInputs& in, const GramFactors& factors,
                         const at::Tensor& G, const OutputMask& mask, GradBuffers& bufs,
                         Matmul mm) {
  if (mask[kV] || mask[kB]) {
    const at::Tensor D = mm(factors.Ma, G);
    if (mask[kV]) bufs.acc[kV] = mm(in.B.t(), D);
    if (mask[kB]) bufs.acc[kB] = mm(D, in.V.t());
  }
  if (mask[kA]) bufs.acc[kA] = mm(factors.M, G).mul(factors.M).sum(1);
}

}  // namespace torchext
