// Every schema of torch.ops.torchext. The kernels register by dispatch key
// elsewhere: Meta (meta/), CPU (cpu/), CUDA (cuda/), the plain-eager autograd
// node and the legacy-vmap kernels (autograd/); autograd, vmap and autocast
// rules are registered from Python (torchext/_registrations.py). Test-only
// ops live in their own namespace (testing/testing_ops.cpp).
#include <torch/library.h>

TORCH_LIBRARY(torchext, m) {
  m.def(
      "two_layer_square(Tensor z, Tensor W, Tensor V, Tensor B, Tensor A) "
      "-> Tensor");
  m.def(
      "two_layer_square_backward(Tensor grad, Tensor z, Tensor W, Tensor V, "
      "Tensor B, Tensor A, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // Internal: the forward that also returns what the backward needs (r and
  // q, see Plan in plan.h; (0, k) when keeps_saved says to recompute them, or
  // when not saving) and the state (see SavedState: the plan it ran), and the
  // backward that consumes them. A training forward (save_for_backward)
  // resolves "auto" by the training cost.
  m.def(
      "_two_layer_square_forward(Tensor z, Tensor W, Tensor V, Tensor B, "
      "Tensor A, str plan=\"auto\", bool save_for_backward=False) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_two_layer_square_backward(Tensor grad, Tensor z, Tensor W, Tensor V, "
      "Tensor B, Tensor A, Tensor r, Tensor q, Tensor state, bool[5] output_mask) "
      "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");
  // Internal: the plain-eager route of torchext.two_layer_square, one C++
  // autograd node around the two ops above
  // (autograd/two_layer_square_autograd.cpp).
  m.def(
      "_two_layer_square_autograd(Tensor z, Tensor W, Tensor V, Tensor B, Tensor A, "
      "str plan=\"auto\") -> Tensor");
}
