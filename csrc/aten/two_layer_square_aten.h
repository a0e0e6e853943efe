// The device-generic implementation of every plan in ATen ops.
#pragma once

#include "../buffers.h"
#include "../plan.h"

namespace torchext {

// What the CUDA backend runs around its fused kernels, and what the
// `_..._aten` test ops (testing/testing_ops.cpp) run on the CPU, so CPU CI checks the CUDA algorithm.
// backward_aten zeroes the weight-gradient buffers it accumulates into.
void forward_aten(const Dims& dims, const ComputeInputs& in, Plan plan,
                  int64_t chunk_rows, ForwardOutputs& out);
// r and q undefined: the backward recomputes them chunk by chunk.
void backward_aten(const Dims& dims, const ComputeInputs& in,
                   const at::Tensor& g, const at::Tensor& r,
                   const at::Tensor& q, Plan plan, const OutputMask& mask,
                   int64_t chunk_rows, GradBuffers& bufs);

}  // namespace torchext
