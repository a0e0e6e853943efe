// What the hand-vectorised AVX-512 CPU kernels share: the switch that turns
// them on, and the target attribute. Only functions marked TX_AVX512 use
// AVX-512, and they run only after avx512_kernels_supported() said yes, so
// one binary serves CPUs with and without it.
#pragma once

#include <cstdint>

// TORCHEXT_NO_AVX512 builds without them, as on other architectures (CI
// compiles that way to keep the portable path building).
#if !defined(TORCHEXT_NO_AVX512) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TORCHEXT_AVX512 1
// GCC 12 reports its own _mm512_undefined_* placeholders inside the
// intrinsic headers as "maybe uninitialized"; nothing here reads them.
// (clang has no such warning and would warn about the unknown name.)
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#define TX_AVX512 __attribute__((target("avx512f")))
#else
#define TORCHEXT_AVX512 0
#endif

namespace torchext {
namespace cpu {

// Whether the AVX-512 kernels run (kernel_set.h: the float32 kernel set is
// avx512); raises when TORCHEXT_CPU_KERNELS asks for a set that cannot run.
bool avx512_kernels_supported();

constexpr int64_t kLanes = 16;  // floats per __m512

#if TORCHEXT_AVX512

// The first `left` lanes (all of them from 16 on, none at 0 or below).
TX_AVX512 inline __mmask16 lanes_mask(int64_t left) {
  if (left >= kLanes) return __mmask16(0xFFFF);
  if (left <= 0) return __mmask16(0);
  return __mmask16((1u << left) - 1u);
}

// In-place transpose of a 16 × 16 tile held in 16 registers (row i -> column i).
TX_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4b + i], 128-bit lane L: element 4L + i of rows 4b .. 4b + 3.
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    u[4 * b + 0] = _mm512_shuffle_ps(t[4 * b], t[4 * b + 2], 0x44);
    u[4 * b + 1] = _mm512_shuffle_ps(t[4 * b], t[4 * b + 2], 0xEE);
    u[4 * b + 2] = _mm512_shuffle_ps(t[4 * b + 1], t[4 * b + 3], 0x44);
    u[4 * b + 3] = _mm512_shuffle_ps(t[4 * b + 1], t[4 * b + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xDD);
    const __m512 w0 = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xDD);
    r[i] = _mm512_shuffle_f32x4(v0, w0, 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(v1, w1, 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
  }
}
#endif

}  // namespace cpu
}  // namespace torchext
