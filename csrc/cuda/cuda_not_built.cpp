// Compiled only into CPU-only builds: CUDA tensors get a message that says how
// to rebuild instead of the dispatcher's generic "no kernel" error.
#include "../kernel_frames.h"
#include "cuda_switches.h"

#include <torch/library.h>

namespace torchext {
namespace {

[[noreturn]] void fail() {
  TORCH_CHECK(false,
              "two_layer_square: torchext was built without CUDA kernels, so "
              "it cannot run on CUDA tensors. Rebuild it on a machine with a "
              "CUDA toolkit and the CUDA build of torch: "
              "`FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda pip install "
              "--no-build-isolation --force-reinstall --no-deps .` "
              "(see `python -m torchext --build-info`).");
}

// Kernels that fail: the arguments are checked first, as on every backend.
void forward_unavailable(const Dims&, const ComputeInputs&, Plan, ForwardOutputs&) { fail(); }

void backward_unavailable(const Dims&, const ComputeInputs&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, Plan, const OutputMask&,
                          GradBuffers&) {
  fail();
}

}  // namespace

// Without the CUDA kernels there is no switch to read.
void reread_cuda_switches() {}

TORCH_LIBRARY_IMPL(torchext, CUDA, m) {
  register_kernels<&forward_unavailable, &backward_unavailable>(m);
}

}  // namespace torchext
