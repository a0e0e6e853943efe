// The argument checks, one copy used by the CPU, CUDA and Meta kernels, and
// the problem sizes they establish.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace torchext {

// The name every error message starts with.
inline constexpr const char* kOp = "two_layer_square";

// Order of the differentiable inputs; also the order of output_mask and of
// the backward op's results.
enum InputIndex : int { kZ = 0, kW = 1, kV = 2, kB = 3, kA = 4, kNumInputs = 5 };
using OutputMask = std::array<bool, kNumInputs>;

// Sizes of one call. SymInt so the Meta kernels (torch.compile, export with
// dynamic shapes) run the very same checks as the real kernels.
struct SymDims {
  c10::SymInt N, d, k, m, ell;
  std::vector<c10::SymInt> batch_shape;  // z.shape[:-1]
};

struct Dims {
  int64_t N, d, k, m, ell;
  std::vector<int64_t> batch_shape;
};

// Raises TypeError unless t is a dense (strided, not nested) tensor; name is
// the argument's.
void check_dense(const at::Tensor& t, const char* name);

// Validates (z, W, V, B, A). Raises ValueError (shape), TypeError (dtype) or
// RuntimeError (device); every message names the argument and the expected
// shape in terms of d, k, m, ell.
SymDims check_forward_args(const at::Tensor& z, const at::Tensor& W,
                           const at::Tensor& V, const at::Tensor& B,
                           const at::Tensor& A);

// As above, plus the incoming gradient: shape z.shape[:-1], dtype and device of z.
SymDims check_backward_args(const at::Tensor& grad, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V,
                            const at::Tensor& B, const at::Tensor& A);

Dims concrete(const SymDims& dims);


// Raises ValueError unless name is "auto", "direct", "folded" or "quadratic".
void check_plan_name(c10::string_view name);

// For messages: "torch.float32", "(3, 4)".
std::string dtype_name(at::ScalarType t);
std::string shape_str(c10::SymIntArrayRef sizes);

}  // namespace torchext
