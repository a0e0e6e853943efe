// What the CPU backend shows outside its file: the matrix product its kernels
// run on, for the test-only op torchext_testing::_cpu_matmul.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchext {

// a @ b (2-D, both float32 or both float64) as the CPU kernels compute it:
// the AVX-512 kernel where it runs, else BLAS, in fixed row blocks.
at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b);

}  // namespace torchext
