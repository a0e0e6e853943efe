// TORCHEXT_CUDA_KERNELS is read once, when the library loads; the test-only
// op torchext_testing::_cuda_reread_switches reads it again.
#pragma once

namespace torchext {

void reread_cuda_switches();

}  // namespace torchext
