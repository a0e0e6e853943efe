// The avx512 kernel set: simd_kernels_impl.h compiled for simd::Avx512.
#include "simd_kernels.h"
#include "simd_vec.h"

namespace torchext {
namespace cpu {

#if TORCHEXT_AVX512
namespace avx512_set {
using V = simd::Avx512;
#define TX TX_AVX512
#include "simd_kernels_impl.h"
#undef TX
}  // namespace avx512_set

const SimdKernels* avx512_kernels() { return avx512_set::kernels::table("avx512"); }
#else
const SimdKernels* avx512_kernels() { return nullptr; }
#endif

}  // namespace cpu
}  // namespace torchext
