// Which CPU kernel set runs, per dtype: the hand-vectorised float32 kernels
// (avx512) where this build has them and this CPU runs them, else the
// generic ones (BLAS products and auto-vectorised loops). TORCHEXT_CPU_KERNELS
// (auto, avx512, avx2, neon, generic; read once) forces a set; one this build
// or this CPU cannot run is an error at the first call, never a crash.
#pragma once

#include <string>
#include <vector>

namespace torchext {
namespace cpu {

enum class KernelSet { kGeneric, kAvx512 };

const char* kernel_set_name(KernelSet set);

// The sets compiled into this library for float32 (float64: generic only).
std::vector<KernelSet> compiled_float32_kernel_sets();
// Their names, joined by sep.
std::string compiled_kernel_set_names(const char* sep);

// The float32 set that runs; raises (RuntimeError) with kernel_set_error().
KernelSet float32_kernel_set();

// Why TORCHEXT_CPU_KERNELS cannot be honoured, or "" when it can.
const std::string& kernel_set_error();

// The BLAS library the generic kernels call ("MKL", "BLAS" for another one
// exporting sgemm_/dgemm_), or nullptr when none was found: then they run
// portable loops.
const char* blas_name();

}  // namespace cpu
}  // namespace torchext
