// The device-generic implementation of every plan in ATen ops, chunk by
// chunk. The CUDA backend runs it around its fused kernels; for CPU tensors it
// is registered as the test-only ops
// `torchext_testing::_two_layer_square_{forward,backward}_aten` so that the
// algorithm the GPU runs is checked by CI on machines without one.
#include "two_layer_square_aten.h"

#include "../head.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

namespace torchext {

// ReLU's derivative as torch's threshold_backward(grad, r, 0): a select, so a
// NaN upstream stays out of inactive units, and a NaN unit passes its gradient.
static at::Tensor relu_backward(const at::Tensor& grad, const at::Tensor& r) {
  return at::where(r.le(0), at::zeros({}, grad.options()), grad);
}

namespace {

struct ChunkOutputs {
  at::Tensor f, r, q;
};

// One chunk: r = relu(z Wᵀ), then the plan's head gives f and (want_q) q.
ChunkOutputs forward_chunk(const Dims& dims, const ComputeInputs& in, const Head& head,
                           Plan plan, const at::Tensor& zc, bool want_q) {
  ChunkOutputs out;
  out.r = at::relu(at::mm(zc, in.W.t()));
  switch (plan) {
    case Plan::kDirect: {
      const at::Tensor y = at::mm(at::mm(out.r, in.V.t()), in.B.t());
      out.f = at::mv(y.mul(y), in.a);
      if (want_q) {  // the q slot: y, or zeros (see Plan)
        out.q = at::zeros_like(out.r);
        if (direct_saves_y(dims)) out.q.narrow(1, 0, dims.ell).copy_(y);
      }
      break;
    }
    case Plan::kFolded: {
      const at::Tensor y = at::mm(out.r, head.M.t());
      out.f = at::mv(y.mul(y), in.a);
      if (want_q) out.q = at::mm(y.mul(in.a), head.M);
      break;
    }
    case Plan::kQuadratic:
      out.q = at::mm(out.r, head.Q.t());
      out.f = out.r.mul(out.q).sum(1);
      break;
  }
  return out;
}

}  // namespace

void forward_aten(const Dims& dims, const ComputeInputs& in, Plan plan,
                  int64_t chunk_rows, ForwardOutputs& out) {
  const bool save = out.r.size(0) == dims.N;
  const Head head = fold_head(in, plan);
  for (int64_t r0 = 0; r0 < dims.N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, dims.N - r0);
    const ChunkOutputs c = forward_chunk(dims, in, head, plan, in.z.narrow(0, r0, n), save);
    out.f.narrow(0, r0, n).copy_(c.f);
    if (save) {
      out.r.narrow(0, r0, n).copy_(c.r);
      out.q.narrow(0, r0, n).copy_(c.q);
    }
  }
}

void backward_aten(const Dims& dims, const ComputeInputs& in,
                   const at::Tensor& g, const at::Tensor& r_all,
                   const at::Tensor& q_all, Plan plan, const OutputMask& mask,
                   int64_t chunk_rows, GradBuffers& bufs) {
  const bool need_p = mask[kZ] || mask[kW];
  const bool need_head = mask[kV] || mask[kB] || mask[kA];
  const bool use_gram = need_head && plan != Plan::kDirect;
  const bool recompute = !r_all.defined();
  const Head head = recompute ? fold_head(in, plan) : Head{};
  at::Tensor G = use_gram ? at::zeros({dims.k, dims.k}, in.z.options()) : at::Tensor();
  const GramFactors factors = use_gram ? gram_factors(in, head, mask) : GramFactors{};
  // The buffers come uninitialised (allocate_grad_buffers); these loops add
  // into them.
  for (int i : {kW, kV, kB, kA})
    if (mask[i]) bufs.acc[i].zero_();
  for (int64_t r0 = 0; r0 < dims.N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, dims.N - r0);
    const at::Tensor zc = in.z.narrow(0, r0, n);
    at::Tensor r, q;
    if (recompute && plan == Plan::kDirect) {
      r = at::relu(at::mm(zc, in.W.t()));
    } else if (recompute) {
      ChunkOutputs c = forward_chunk(dims, in, head, plan, zc, need_p);
      r = c.r;
      q = c.q;
    } else {
      r = r_all.narrow(0, r0, n);
      q = q_all.narrow(0, r0, n);
    }
    const at::Tensor gc = g.narrow(0, r0, n).unsqueeze(1);
    at::Tensor p;
    if (plan == Plan::kDirect) {
      // The chain in the eager association order, from the saved y when there
      // is one (u = V r then only for dB).
      const bool saved_y = !recompute && direct_saves_y(dims);
      const at::Tensor u = saved_y && !mask[kB] ? at::Tensor() : at::mm(r, in.V.t());
      const at::Tensor y = saved_y ? q.narrow(1, 0, dims.ell) : at::mm(u, in.B.t());
      if (mask[kA]) bufs.acc[kA].addmv_(y.mul(y).t(), gc.squeeze(1));
      const at::Tensor gay = gc.mul(in.a).mul(y);  // 2 g a y as t + t (see the CPU chain)
      const at::Tensor e = gay.add(gay);
      if (mask[kB]) bufs.acc[kB].addmm_(e.t(), u);
      if (mask[kV] || need_p) {
        const at::Tensor gu = at::mm(e, in.B);
        if (mask[kV]) bufs.acc[kV].addmm_(gu.t(), r);
        if (need_p) p = relu_backward(at::mm(gu, in.V), r);
      }
    } else {
      if (need_p) {
        const at::Tensor gq = gc.mul(q);
        p = relu_backward(gq.add(gq), r);
      }
      if (use_gram) G.addmm_(r.mul(gc).t(), r);
    }
    if (need_p) {
      if (mask[kW]) bufs.acc[kW].addmm_(p.t(), zc);
      if (mask[kZ]) {
        at::Tensor gz = bufs.acc[kZ].narrow(0, r0, n);
        at::mm_out(gz, p, in.W);
      }
    }
  }
  if (use_gram) {
    add_grads_from_gram(in, factors, G, mask, bufs);
  }
}

}  // namespace torchext
