#include "buffers.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <atomic>
#include <limits>

namespace torchext {

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

namespace {
std::atomic<bool> poison_uninitialized{false};
}  // namespace

void set_poisoning_uninitialized(bool enabled) { poison_uninitialized.store(enabled); }

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

}  // namespace torchext
