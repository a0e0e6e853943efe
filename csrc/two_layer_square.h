// Shared contract of the torchext::two_layer_square operators: argument
// validation (one copy, used by the CPU, CUDA and Meta kernels), the problem
// sizes, the way inputs are brought to the compute dtype, and the batch
// partition that makes every reduction over samples bitwise reproducible.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace torchext {

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

// Dtype the kernels compute and accumulate in: float32 for the half types,
// otherwise the input dtype.
at::ScalarType compute_dtype(at::ScalarType input_dtype);

// The inputs as contiguous compute-dtype tensors: z as (N, d), a = A as (ell,).
// Views of the caller's tensors when they already qualify (no copy).
struct ComputeInputs {
  at::Tensor z, W, V, B, a;
};
ComputeInputs to_compute_inputs(const Dims& dims, const at::Tensor& z,
                                const at::Tensor& W, const at::Tensor& V,
                                const at::Tensor& B, const at::Tensor& A);

// Incoming gradient as a contiguous (N,) compute-dtype tensor (materialises
// the stride-0 gradient that `.sum()` produces).
at::Tensor grad_to_compute(const Dims& dims, const at::Tensor& grad);

// How a call splits the batch. Depends on the sizes only, never on the thread
// count or timing, so every reduction over samples has a fixed order:
// rows [0, N) are cut into chunks of `chunk_rows`; consecutive chunks are
// grouped into `partitions` groups; each partition accumulates its own
// partial weight gradients over its chunks in order, and the partials are
// summed in partition order.
struct BatchPlan {
  int64_t chunk_rows;
  int64_t num_chunks;
  int64_t partitions;
  int64_t chunks_per_partition;
};
// Chunks hold about `scratch_elems` elements of working set, but at least
// `min_rows` rows (the weight-gradient products over a chunk need enough rows
// to amortise reading and writing the gradient); `max_partitions` bounds the
// number of partial gradient buffers.
BatchPlan make_batch_plan(const Dims& dims, int64_t scratch_elems,
                          int64_t min_rows, int64_t max_partitions);

// Allocates the requested gradients in the compute dtype (zero-filled for
// the weights, which are accumulated; gz is written row by row).
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

// The frame every backend's forward shares: check, bring the inputs to the
// compute dtype, allocate f, run `kernel(dims, inputs, f)` on a non-empty
// batch, cast f back. Backends differ only in the kernel.
template <typename Kernel>
at::Tensor run_forward(const at::Tensor& z, const at::Tensor& W,
                       const at::Tensor& V, const at::Tensor& B,
                       const at::Tensor& A, Kernel&& kernel) {
  const Dims dims = concrete(check_forward_args(z, W, V, B, A));
  const ComputeInputs in = to_compute_inputs(dims, z, W, V, B, A);
  at::Tensor f = at::empty({dims.N}, in.z.options());
  if (dims.N > 0) kernel(dims, in, f);
  return finish_forward(dims, std::move(f), z);
}

// Same for the backward: `kernel(dims, inputs, grad, mask, buffers)` runs only
// when the batch is non-empty and some gradient is requested (the buffers are
// already the right zeros otherwise).
template <typename Kernel>
BackwardResult run_backward(const at::Tensor& grad, const at::Tensor& z,
                            const at::Tensor& W, const at::Tensor& V,
                            const at::Tensor& B, const at::Tensor& A,
                            const OutputMask& mask, Kernel&& kernel) {
  const Dims dims = concrete(check_backward_args(grad, z, W, V, B, A));
  const ComputeInputs in = to_compute_inputs(dims, z, W, V, B, A);
  GradBuffers bufs = allocate_grad_buffers(dims, in, mask);
  bool any = false;
  for (bool b : mask) any = any || b;
  if (dims.N > 0 && any) kernel(dims, in, grad_to_compute(dims, grad), mask, bufs);
  return to_tuple(finish_grads(dims, std::move(bufs), z, W, V, B, A));
}

}  // namespace torchext
