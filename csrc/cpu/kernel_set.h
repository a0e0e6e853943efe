// Which CPU kernel set runs, per dtype: for float32 the hand-vectorised
// kernels (simd_kernels.h) of the widest instruction set this build has and
// this CPU runs (avx512, avx2, neon), else the generic ones (BLAS products
// and auto-vectorised loops); float64 always runs the generic ones.
// TORCHEXT_CPU_KERNELS (auto, avx512, avx2, neon, generic; read once) forces
// a set; one this build or this CPU cannot run is an error at every call,
// never a crash.
#pragma once

#include "simd_kernels.h"

#include <string>

namespace torchext {
namespace cpu {

// The names of the float32 sets compiled into this library, widest first,
// generic last, joined by sep.
std::string compiled_kernel_set_names(const char* sep);

// The float32 SIMD kernels that run, or null for the generic ones; raises
// (RuntimeError) with kernel_set_error() when the choice cannot be honoured.
const SimdKernels* float32_simd_kernels();

// The name of the float32 set that runs ("generic" included).
const char* float32_kernel_set_name();

// Why TORCHEXT_CPU_KERNELS cannot be honoured, or "" when it can.
const std::string& kernel_set_error();

// Vector FMAs per second (GFLOP/s, 2 per lane) of `threads` threads each
// running the register-only loop of the running set for about `seconds`
// (the generic set: of the widest set this CPU runs, what its BLAS can use).
// 0 when no set runs here, or for threads outside [1, 1024] or seconds
// outside (0, 60].
double fma_rate_gflops(int threads, double seconds);

// The BLAS library the generic kernels call ("MKL", "BLAS" for another one
// exporting sgemm_/dgemm_), or nullptr when none was found: then they run
// portable loops.
const char* blas_name();

}  // namespace cpu
}  // namespace torchext
