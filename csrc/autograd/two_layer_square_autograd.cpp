// The autograd code in C++: the plain-eager route of torchext.two_layer_square
// (the planned forward and its fused backward as one C++ autograd node), and
// the backward ops' kernels for the legacy vmap of is_grads_batched.
//
// Why C++: a Python autograd.Function's own overhead per forward+backward is
// more than eager PyTorch's whole chain at the seed sizes (z a vector of 16;
// see the seed-vector case of benchmarks/bench.py). Here the forward is one dispatcher call and the
// backward node never enters Python. Autograd stays registered from Python
// for every op (torch.library.register_autograd); this op is only called by
// torchext.two_layer_square outside torch.compile tracing, torch.func
// transforms and forward-mode AD, which take the routes of
// torchext/_registrations.py. With
// create_graph=True the backward calls the backward op through autograd, so
// its Python-registered formula makes the gradients differentiable again.
#include "../buffers.h"
#include "../checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/LegacyVmapTransforms.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <functional>
#include <string>
#include <vector>

namespace torchext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchext::_two_layer_square_forward", "")
          .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, c10::string_view,
                               bool)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchext::_two_layer_square_backward", "")
          .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                std::array<bool, 5>)>();
  return op;
}

}  // namespace

// Its grad_fn shows as torch::autograd::CppNode<torchext::FusedTwoLayerSquare>.
struct FusedTwoLayerSquare : public torch::autograd::Function<FusedTwoLayerSquare> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V,
                            const at::Tensor& B, const at::Tensor& A,
                            c10::string_view plan) {
    // apply() has turned grad mode off; also skip the ops' own (Python)
    // autograd kernels, which would only find nothing to record.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [f, r, q, state] = forward_op().call(z, W, V, B, A, plan, /*save=*/true);
    // r and q never receive gradients; no zero-filled grads for them either.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({z, W, V, B, A, r, q, state});
    return f;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    variable_list out(6);
    std::array<bool, 5> mask{};
    bool any = false;
    for (int i = 0; i < kNumInputs; ++i) any |= mask[i] = ctx->needs_input_grad(i);
    if (!grads[0].defined() || !any) return out;
    // A dual gradient (forward over reverse, a dual level opened after this
    // forward): this node cannot carry its tangent; the Python route can.
    TORCH_CHECK(!grads[0]._fw_grad(/*level=*/0).defined(),
                "two_layer_square: forward-mode AD through its backward needs the forward "
                "to run inside the torch.autograd.forward_ad.dual_level() (or under torch.func); "
                "this f was computed outside it");
    // (Under autocast the op was cast on entry, torchext/_registrations.py:
    // the saved inputs, f and its gradient share one dtype.)
    auto call = [&] {
      return backward_op().call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                saved[5], saved[6], saved[7], mask);
    };
    // create_graph=True: through the ops' autograd, so that the result is
    // differentiable; otherwise straight to the kernels.
    BackwardResult res;
    if (at::GradMode::is_enabled()) {
      res = call();
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      res = call();
    }
    auto take = [](std::optional<at::Tensor>& t) { return t ? std::move(*t) : at::Tensor(); };
    out[0] = take(std::get<0>(res));
    out[1] = take(std::get<1>(res));
    out[2] = take(std::get<2>(res));
    out[3] = take(std::get<3>(res));
    out[4] = take(std::get<4>(res));
    return out;
  }
};

namespace {

at::Tensor two_layer_square_autograd(const at::Tensor& z, const at::Tensor& W,
                                     const at::Tensor& V, const at::Tensor& B,
                                     const at::Tensor& A, c10::string_view plan) {
  // First: apply() records the inputs' sizes, which a nested tensor refuses
  // with an internal error, and a jagged one's own dispatch would refuse the
  // forward op without naming the argument.
  check_dense(z, "z");
  check_dense(W, "W");
  check_dense(V, "V");
  check_dense(B, "B");
  check_dense(A, "A");
  const bool record = at::GradMode::is_enabled() &&
                      (z.requires_grad() || W.requires_grad() || V.requires_grad() ||
                       B.requires_grad() || A.requires_grad());
  if (!record) {  // nothing to differentiate: the forward alone, nothing saved
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return std::get<0>(forward_op().call(z, W, V, B, A, plan, /*save=*/false));
  }
  return FusedTwoLayerSquare::apply(z, W, V, B, A, plan);
}

// torch.autograd.grad(..., is_grads_batched=True) — and so
// torch.autograd.functional.jacobian/hessian(vectorize=True) — runs the
// backward under the legacy vmap, whose generic fallback cannot handle ops
// returning Tensor?. Weight gradients sum over the samples of one batch
// member only, so each member gets its own fused backward call; results are
// stacked and handed back batched.
BackwardResult backward_per_member(
    const std::function<BackwardResult(const std::vector<at::Tensor>&)>& call,
    std::vector<at::Tensor> logical, const std::array<bool, 5>& mask) {
  auto physical = at::MultiBatchVmapTransform::logicalToPhysical(logical);
  const int64_t nb = physical[0].numBatchDims();
  const auto batch_sizes = physical[0].tensor().sizes().slice(0, nb);
  int64_t members = 1;
  for (int64_t s : batch_sizes) members *= s;
  std::vector<at::Tensor> flat;
  for (auto& view : physical) {
    auto sizes = view.tensor().sizes().vec();
    sizes.erase(sizes.begin(), sizes.begin() + nb);
    sizes.insert(sizes.begin(), members);
    flat.push_back(view.tensor().reshape(sizes));
  }
  std::array<std::vector<at::Tensor>, kNumInputs> parts;
  {
    c10::impl::ExcludeDispatchKeyGuard unbatched(c10::DispatchKey::Batched);
    for (int64_t b = 0; b < members; ++b) {
      std::vector<at::Tensor> args;
      for (const auto& t : flat) args.push_back(t.select(0, b));
      auto res = call(args);
      std::array<std::optional<at::Tensor>*, kNumInputs> outs = {
          &std::get<0>(res), &std::get<1>(res), &std::get<2>(res), &std::get<3>(res),
          &std::get<4>(res)};
      for (int i = 0; i < kNumInputs; ++i)
        if (*outs[i]) parts[i].push_back(std::move(**outs[i]));
    }
  }
  const auto to_logical = physical[0].getPhysicalToLogicalMap();
  std::array<std::optional<at::Tensor>, kNumInputs> out;
  for (int i = 0; i < kNumInputs; ++i) {
    if (!mask[i]) continue;
    // Member i's gradient has input i's (logical) shape; physical[i + 1] is input i.
    auto shape = physical[i + 1].tensor().sizes().vec();
    at::Tensor stacked;
    {
      c10::impl::ExcludeDispatchKeyGuard unbatched(c10::DispatchKey::Batched);
      stacked = parts[i].empty()
                    ? at::empty(shape, flat[i + 1].options())
                    : at::stack(parts[i]).reshape(shape);
    }
    out[i] = to_logical.apply(stacked);
  }
  return to_tuple(std::move(out));
}

// The state is the forward's, shared by every member (never batched).
BackwardResult internal_backward_batched(const at::Tensor& grad, const at::Tensor& z,
                                         const at::Tensor& W, const at::Tensor& V,
                                         const at::Tensor& B, const at::Tensor& A,
                                         const at::Tensor& r, const at::Tensor& q,
                                         const at::Tensor& state, std::array<bool, 5> mask) {
  TORCH_CHECK_VALUE(!at::isBatchedTensor(state),
                    "two_layer_square: the state of a forward cannot be batched");
  return backward_per_member(
      [&](const std::vector<at::Tensor>& a) {
        return backward_op().call(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], state,
                                  mask);
      },
      {grad, z, W, V, B, A, r, q}, mask);
}

BackwardResult public_backward_batched(const at::Tensor& grad, const at::Tensor& z,
                                       const at::Tensor& W, const at::Tensor& V,
                                       const at::Tensor& B, const at::Tensor& A,
                                       std::array<bool, 5> mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("torchext::two_layer_square_backward", "")
          .typed<BackwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                std::array<bool, 5>)>();
  return backward_per_member(
      [&](const std::vector<at::Tensor>& a) {
        return op.call(a[0], a[1], a[2], a[3], a[4], a[5], mask);
      },
      {grad, z, W, V, B, A}, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(torchext, Batched, m) {
  m.impl("_two_layer_square_backward", &internal_backward_batched);
  m.impl("two_layer_square_backward", &public_backward_batched);
}

TORCH_LIBRARY_IMPL(torchext, CompositeImplicitAutograd, m) {
  m.impl("_two_layer_square_autograd", &two_layer_square_autograd);
}

}  // namespace torchext
