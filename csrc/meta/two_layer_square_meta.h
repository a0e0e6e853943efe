// The internal ops' Meta kernels, which the test-only twins of those ops
// (testing/testing_ops.cpp) register too.
#pragma once

#include "../buffers.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>

namespace torchext {

ForwardResult forward_internal_meta(const at::Tensor& z, const at::Tensor& W,
                                    const at::Tensor& V, const at::Tensor& B,
                                    const at::Tensor& A, c10::string_view plan,
                                    bool save_for_backward);

BackwardResult backward_internal_meta(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& W,
    const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
    const at::Tensor& r, const at::Tensor& q, const at::Tensor& state,
    std::array<bool, 5> output_mask);

}  // namespace torchext
