// Kernels for the dispatch keys of tensors that are not dense (sparse,
// nested, mkldnn): no backend computes on them, and without a kernel there
// the dispatcher's own error names no argument. This one runs the checks'
// test on each tensor argument, so the message names the offending one.
#include "checks.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

namespace torchext {
namespace {

void refuse_layout(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto values = torch::jit::last(*stack, args.size());
  for (size_t i = 0; i < args.size(); ++i)
    if (values[i].isTensor()) check_dense(values[i].toTensor(), args[i].name().c_str());
  // Only a dispatch key set without a non-dense tensor gets here (a wrapper
  // subclass that set such a key on a dense tensor).
  TORCH_CHECK_TYPE(false, kOp, ": ", op.schema().name(),
                   " takes dense (strided) tensors only; got a dispatch key of "
                   "another layout");
}

void register_refusals(torch::Library& m) {
  for (const char* name : {"two_layer_square", "two_layer_square_backward",
                           "_two_layer_square_forward", "_two_layer_square_backward"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&refuse_layout>());
}

}  // namespace

TORCH_LIBRARY_IMPL(torchext, SparseCPU, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(torchext, SparseCUDA, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(torchext, SparseCsrCPU, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(torchext, SparseCsrCUDA, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(torchext, NestedTensorCPU, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(torchext, NestedTensorCUDA, m) { register_refusals(m); }
TORCH_LIBRARY_IMPL(torchext, MkldnnCPU, m) { register_refusals(m); }

}  // namespace torchext
