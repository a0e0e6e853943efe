// The Meta kernels: shape inference for torch.compile, torch.export and
// FakeTensor, through the very checks the real kernels run (on SymInts).
#include "two_layer_square_meta.h"

#include "../checks.h"
#include "../plan.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace torchext {
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

ForwardResult forward_internal_meta(const at::Tensor& z, const at::Tensor& W,
                                    const at::Tensor& V, const at::Tensor& B,
                                    const at::Tensor& A, c10::string_view plan,
                                    bool save_for_backward) {
  SymDims dims = check_forward_args(z, W, V, B, A);
  check_plan_name(plan);
  const auto opts = z.options().dtype(compute_dtype(z.scalar_type()));
  const bool saved = save_for_backward && keeps_saved(dims.d, dims.k);
  const c10::SymInt rows = saved ? dims.N : c10::SymInt(0);
  // A training forward's state holds the resolved plan: "auto" specialises
  // the weights' sizes and guards on the range of N where the plan holds.
  auto size = [](const c10::SymInt& s) { return s.guard_int(__FILE__, __LINE__); };
  const bool resolve = save_for_backward && !forced_plan(plan);
  TORCH_CHECK(!resolve || dims.N.has_hint(), kOp,
              ": a batch size that depends on data (torch.compile with dynamic output "
              "shapes) needs a forced plan when gradients are wanted: pass plan=\"direct\", "
              "\"folded\" or \"quadratic\"");
  const SavedState state =
      resolve ? forward_state(dims.N, size(dims.d), size(dims.k), size(dims.m), size(dims.ell),
                              plan, save_for_backward, saved)
              : forward_state(int64_t{0}, 0, 0, 0, 0, plan, save_for_backward, saved);
  return {at::empty_symint(dims.batch_shape, z.options()),
          at::empty_symint({rows, dims.k}, opts),
          at::empty_symint({rows, dims.k}, opts),
          make_state(state, z.options())};
}

BackwardResult backward_internal_meta(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& W,
    const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
    const at::Tensor& r, const at::Tensor& q, const at::Tensor& state,
    std::array<bool, 5> output_mask) {
  const SymDims dims = check_backward_args(grad, z, W, V, B, A);
  check_saved(dims, z, read_state(state), r, q);
  return two_layer_square_backward_meta(grad, z, W, V, B, A, output_mask);
}

TORCH_LIBRARY_IMPL(torchext, Meta, m) {
  m.impl("two_layer_square", &two_layer_square_meta);
  m.impl("two_layer_square_backward", &two_layer_square_backward_meta);
  m.impl("_two_layer_square_forward", &forward_internal_meta);
  m.impl("_two_layer_square_backward", &backward_internal_meta);
}


}  // namespace torchext
