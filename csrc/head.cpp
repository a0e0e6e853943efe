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

void add_grads_from_gram(const ComputeInputs& in, const at::Tensor& M,
                         const at::Tensor& G, const OutputMask& mask,
                         GradBuffers& bufs, Matmul mm) {
  if (!(mask[kV] || mask[kB] || mask[kA])) return;
  const at::Tensor MG = mm(M, G);
  if (mask[kV] || mask[kB]) {
    const at::Tensor D = MG.mul(in.a.mul(2).unsqueeze(1));
    if (mask[kV]) bufs.acc[kV] = mm(in.B.t(), D);
    if (mask[kB]) bufs.acc[kB] = mm(D, in.V.t());
  }
  if (mask[kA]) bufs.acc[kA] = MG.mul(M).sum(1);
}

}  // namespace torchext
