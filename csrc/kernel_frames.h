// The op entry points every backend shares: a backend writes only its forward
// and backward kernels, and register_kernels derives the four ops' kernels
// from them (checks, compute dtype, plan, buffers, casts back).
#pragma once

#include "buffers.h"
#include "checks.h"
#include "plan.h"

#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace torchext {

// Autocast off for the ATen ops a kernel calls inside (the products of the
// head and of the ATen path): the kernels work in the compute dtype they
// chose, and a backward() run inside an autocast block runs the backward op
// with autocast on, which would cast those products down (and mix dtypes in
// their in-place accumulations).
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;

// Forward kernel: void(const Dims&, const ComputeInputs&, Plan, ForwardOutputs&).
// run_forward checks, brings the inputs to the compute dtype, resolves the
// plan (once per call: the backward reads it from the state), allocates the
// outputs, runs the kernel on a non-empty batch and casts f back to the
// input dtype.
template <auto Kernel>
ForwardResult run_forward(const at::Tensor& z, const at::Tensor& W, const at::Tensor& V,
                          const at::Tensor& B, const at::Tensor& A,
                          c10::string_view plan_name, bool save, bool training) {
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
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
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
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
  const SymDims sym_dims = check_backward_args(grad, z, W, V, B, A);
  const SavedState saved = read_state(state);
  check_saved(sym_dims, z, saved, r, q);
  const Dims dims = concrete(sym_dims);
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
