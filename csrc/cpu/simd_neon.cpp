// The neon kernel set: simd_kernels_impl.h compiled for simd::Neon.
#include "simd_kernels.h"
#include "simd_vec.h"

namespace torchext {
namespace cpu {

#if TORCHEXT_NEON
namespace neon_set {
using V = simd::Neon;
#define TX  // (NEON is baseline on aarch64)
#include "simd_kernels_impl.h"
#undef TX
}  // namespace neon_set

const SimdKernels* neon_kernels() { return neon_set::kernels::table("neon"); }
#else
const SimdKernels* neon_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace torchext
