// The per-call products of the head (M, Q, and dV, dB, dA from the Gram) on
// the CPU: fixed row blocks, so results do not depend on the thread count.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchext {
namespace cpu {

// a @ b (2-D, float32 or float64, a's dtype) in blocks of 64 output rows,
// each one sequential product, the blocks in parallel; the Matmul of the
// head's algebra (head.h) on the CPU.
at::Tensor cpu_mm(const at::Tensor& a, const at::Tensor& b);

// cpu_mm with its arguments checked: the test-only op
// torchext_testing::_cpu_matmul (also used by the benchmark).
at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b);

}  // namespace cpu
}  // namespace torchext
