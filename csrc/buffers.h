// What the kernels read and write: the inputs in the compute dtype, the
// output and gradient buffers (uninitialised, or poisoned while tests ask),
// and the ops' results in the caller's dtypes.
#pragma once

#include "checks.h"

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

namespace torchext {

// Dtype the kernels compute and accumulate in: float32 for the half types,
// otherwise the input dtype.
at::ScalarType compute_dtype(at::ScalarType input_dtype);

// The inputs as contiguous compute-dtype tensors: z as (N, d), a = A as (ell,).
// Views of the caller's tensors when they already qualify (no copy).
struct ComputeInputs {
  at::Tensor z, W, V, B, a;
  at::ScalarType input_dtype;  // the caller's dtype (half types: z .. a are float32 copies)
};
ComputeInputs to_compute_inputs(const Dims& dims, const at::Tensor& z,
                                const at::Tensor& W, const at::Tensor& V,
                                const at::Tensor& B, const at::Tensor& A);

// Incoming gradient as an (N,) compute-dtype tensor with stride 1, or 0: the
// broadcast scalar that `.sum()` and `.mean()` hand back is passed on as it
// is (kernels read g[i * grad_stride(g)]) rather than materialised.
at::Tensor grad_to_compute(const Dims& dims, const at::Tensor& grad);
// 1, or 0 for a broadcast gradient (and for N <= 1, where it does not matter).
inline int64_t grad_stride(const at::Tensor& g) { return g.size(0) > 1 ? g.stride(0) : 0; }


// Every tensor a kernel writes before reading it (outputs, gradient buffers,
// Grams; of a symmetric Gram, the part the kernels read) comes from here:
// uninitialised, for speed, or NaN-filled while tests ask for it (the
// test-only op _poison_uninitialized), so that an element no kernel wrote
// shows as NaN whatever the allocator hands out. (The CPU kernels' scratch
// and partial sums come from their arenas, cpu/workspace.h, poisoned alike.)
at::Tensor uninitialized(at::IntArrayRef shape, const at::TensorOptions& options);
// Whether tests poison now (for buffers that do not come from `uninitialized`).
bool poisoning_uninitialized();
// The test-only op's switch (csrc/testing/testing_ops.cpp).
void set_poisoning_uninitialized(bool enabled);

// Allocates the requested gradients in the compute dtype, uninitialised: a
// backward kernel writes every gradient it is asked for (one that accumulates
// writes or zeroes it first). An empty batch runs no kernel and gets zeros.
struct GradBuffers {
  std::array<at::Tensor, kNumInputs> acc;  // undefined where not requested
};
GradBuffers allocate_grad_buffers(const Dims& dims, const ComputeInputs& in,
                                  const OutputMask& mask);

// Turns compute-dtype results into the op's outputs: each gradient in its
// input's shape and dtype, contiguous, never aliasing an input.
std::array<std::optional<at::Tensor>, kNumInputs> finish_grads(
    const Dims& dims, GradBuffers&& buffers, const at::Tensor& z,
    const at::Tensor& W, const at::Tensor& V, const at::Tensor& B,
    const at::Tensor& A);

at::Tensor finish_forward(const Dims& dims, at::Tensor f_acc, const at::Tensor& z);

using BackwardResult =
    std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>,
               std::optional<at::Tensor>, std::optional<at::Tensor>,
               std::optional<at::Tensor>>;
BackwardResult to_tuple(std::array<std::optional<at::Tensor>, kNumInputs>&& g);


// Outputs of the internal forward op: f (N,) and, when saving for backward,
// r = relu(W z) and q (each (N, k), compute dtype; (0, k) otherwise; for the
// direct plan q holds y or zeros, see Plan).
struct ForwardOutputs {
  at::Tensor f, r, q;
};
// f, r, q and the state (see SavedState).
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;


}  // namespace torchext
