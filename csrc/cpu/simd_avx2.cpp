// The avx2 kernel set: simd_kernels_impl.h compiled for simd::Avx2.
#include "simd_kernels.h"
#include "simd_vec.h"

namespace torchext {
namespace cpu {

#if TORCHEXT_AVX2
namespace avx2_set {
using V = simd::Avx2;
#define TX TX_AVX2
#include "simd_kernels_impl.h"
#undef TX
}  // namespace avx2_set

const SimdKernels* avx2_kernels() { return avx2_set::kernels::table("avx2"); }
#else
const SimdKernels* avx2_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace torchext
