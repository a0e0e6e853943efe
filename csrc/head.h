// The head's per-call algebra, shared by every backend: the folded products
// M = B V and Q = Mᵀ diag(a) M, and the weight gradients from the Gram.
#pragma once

#include "buffers.h"
#include "plan.h"

#include <ATen/core/Tensor.h>

namespace torchext {

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

// What the weight gradients from the Gram need of the head: Ma = 2 diag(a) M
// where dV or dB is requested without dA, M where dA is (M G, which dA needs,
// then gives D too); M is the head's where it has one, else B V. Made before
// the pass over the batch that sums the Gram (CPU, ATen; CUDA queues it after
// the pass, on the same stream), so that without dA only products follow the
// pass: right after it, the first elementwise op costs several times its own
// work (ATen's code is out of cache). Empty where none of dV, dB, dA is
// requested.
struct GramFactors {
  at::Tensor Ma, M;
};
GramFactors gram_factors(const ComputeInputs& in, const Head& head, const OutputMask& mask,
                         Matmul mm = &aten_mm);

// dV, dB and dA from the Gram G = Σ_n g_n r_n r_nᵀ (k, k), stored in the
// buffers (replacing them): with D = 2 diag(a) M G (Ma G, or from M G where
// dA is requested), dV = Bᵀ D, dB = D Vᵀ, dA_i = (M G Mᵀ)_ii.
void add_grads_from_gram(const ComputeInputs& in, const GramFactors& factors,
                         const at::Tensor& G, const OutputMask& mask, GradBuffers& bufs,
                         Matmul mm = &aten_mm);

}  // namespace torchext
