// The small vector abstraction the SIMD kernels (simd_kernels_impl.h) are
// written in, one struct per instruction set: Avx512 (16 floats), Avx2
// (8 floats, with FMA) and Neon (4 floats). Each has the same members, so
// the kernels are written once, generic over the width, and compiled once per
// set (simd_avx512.cpp, ...). Every x86 member carries its set's target
// attribute: one binary serves every x86 CPU, and the kernel set is picked at
// run time (kernel_set.h). Torch-free, so the kernels' standalone test
// (tests/native/) builds them with a plain compiler, a cross compiler included.
//
// Members: R (a register), M (a lane mask: the first n lanes), kLanes; the
// register tiles the kernels use (kGemmRows × kGemmVecs accumulators for the
// matrix product, kChainRows × 2 for the narrow chain's products, kOuterRows
// × 4 for its outer products), sized to the set's register file; and
// zero, set1, load, store, fma (a·b + c, fused), add, mul, relu (max(0, x),
// NaN stays NaN), where_active (v where not r <= 0, else 0: threshold_backward's
// select), first (the mask of the first n lanes), load_first (lanes past
// the mask read as 0, memory past them is not touched), store_first,
// gather_first / scatter_first (strided), transpose (a kLanes × kLanes tile
// in kLanes registers).
#pragma once

#include <cstdint>
#include <cstring>

// TORCHEXT_NO_SIMD leaves every set out, as on CPUs and compilers none fits
// (CI builds and tests that way too): the generic kernels run.
#if !defined(TORCHEXT_NO_SIMD) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12 reports its own _mm512_undefined_* placeholders inside the
// intrinsic headers as (maybe) uninitialized; nothing here reads them.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#define TORCHEXT_AVX2 1
#define TX_AVX2 __attribute__((target("avx2,fma")))
#define TORCHEXT_AVX512 1
#define TX_AVX512 __attribute__((target("avx512f")))
#endif
#if !defined(TORCHEXT_NO_SIMD) && defined(__aarch64__)
#include <arm_neon.h>
#define TORCHEXT_NEON 1  // (baseline on aarch64: no target attribute)
#endif
#ifndef TORCHEXT_AVX2
#define TORCHEXT_AVX2 0
#endif
#ifndef TORCHEXT_AVX512
#define TORCHEXT_AVX512 0
#endif
#ifndef TORCHEXT_NEON
#define TORCHEXT_NEON 0
#endif

namespace torchext {
namespace cpu {
namespace simd {

#if TORCHEXT_AVX512
struct Avx512 {
  using R = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static constexpr int kGemmRows = 8, kGemmVecs = 2, kChainRows = 8, kOuterRows = 4;

  TX_AVX512 static R zero() { return _mm512_setzero_ps(); }
  TX_AVX512 static R set1(float x) { return _mm512_set1_ps(x); }
  TX_AVX512 static R load(const float* p) { return _mm512_loadu_ps(p); }
  TX_AVX512 static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  TX_AVX512 static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  TX_AVX512 static R add(R a, R b) { return _mm512_add_ps(a, b); }
  TX_AVX512 static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  // max returns its second operand when one is NaN.
  TX_AVX512 static R relu(R x) { return _mm512_max_ps(zero(), x); }
  TX_AVX512 static R where_active(R r, R v) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, zero(), _CMP_NLE_UQ), v);
  }
  TX_AVX512 static M first(int64_t n) {
    return n >= kLanes ? M(0xFFFF) : n <= 0 ? M(0) : M((1u << n) - 1u);
  }
  TX_AVX512 static R load_first(M m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  TX_AVX512 static void store_first(float* p, M m, R v) { _mm512_mask_storeu_ps(p, m, v); }
  TX_AVX512 static __m512i offsets(int64_t stride) {
    return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                              _mm512_set1_epi32(int(stride)));
  }
  // (stride · 15 fits an int: the narrow kernels' strides are at most kNarrowMaxD)
  TX_AVX512 static R gather_first(M m, const float* p, int64_t stride) {
    return _mm512_mask_i32gather_ps(zero(), m, offsets(stride), p, 4);
  }
  TX_AVX512 static void scatter_first(float* p, int64_t stride, M m, R v) {
    _mm512_mask_i32scatter_ps(p, m, offsets(stride), v, 4);
  }
  // Row i -> column i, in registers.
  TX_AVX512 static void transpose(R r[16]) {
    R t[16], u[16];
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
      const R v0 = _mm512_shuffle_f32x4(u[i], u[4 + i], 0x88);
      const R v1 = _mm512_shuffle_f32x4(u[i], u[4 + i], 0xDD);
      const R w0 = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0x88);
      const R w1 = _mm512_shuffle_f32x4(u[8 + i], u[12 + i], 0xDD);
      r[i] = _mm512_shuffle_f32x4(v0, w0, 0x88);
      r[8 + i] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
      r[4 + i] = _mm512_shuffle_f32x4(v1, w1, 0x88);
      r[12 + i] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
  }
};
#endif

#if TORCHEXT_AVX2
// 16 ymm registers: a 6 × 16 product tile (12 accumulators), 4-row chain tiles.
struct Avx2 {
  using R = __m256;
  using M = __m256i;
  static constexpr int64_t kLanes = 8;
  static constexpr int kGemmRows = 6, kGemmVecs = 2, kChainRows = 4, kOuterRows = 2;

  TX_AVX2 static R zero() { return _mm256_setzero_ps(); }
  TX_AVX2 static R set1(float x) { return _mm256_set1_ps(x); }
  TX_AVX2 static R load(const float* p) { return _mm256_loadu_ps(p); }
  TX_AVX2 static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  TX_AVX2 static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  TX_AVX2 static R add(R a, R b) { return _mm256_add_ps(a, b); }
  TX_AVX2 static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  TX_AVX2 static R relu(R x) { return _mm256_max_ps(zero(), x); }
  TX_AVX2 static R where_active(R r, R v) {
    return _mm256_and_ps(_mm256_cmp_ps(r, zero(), _CMP_NLE_UQ), v);
  }
  TX_AVX2 static M first(int64_t n) {
    const int c = n >= kLanes ? int(kLanes) : n <= 0 ? 0 : int(n);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  TX_AVX2 static R load_first(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  TX_AVX2 static void store_first(float* p, M m, R v) { _mm256_maskstore_ps(p, m, v); }
  TX_AVX2 static R gather_first(M m, const float* p, int64_t stride) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                           _mm256_set1_epi32(int(stride)));
    return _mm256_mask_i32gather_ps(zero(), p, idx, _mm256_castsi256_ps(m), 4);
  }
  TX_AVX2 static void scatter_first(float* p, int64_t stride, M m, R v) {
    alignas(32) float l[kLanes];
    alignas(32) int32_t on[kLanes];
    store(l, v);
    _mm256_store_si256(reinterpret_cast<__m256i*>(on), m);
    for (int64_t i = 0; i < kLanes; ++i)
      if (on[i] != 0) p[i * stride] = l[i];
  }
  TX_AVX2 static void transpose(R r[8]) {
    R t[8], u[8];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4b + i], 128-bit lane L: element 4L + i of rows 4b .. 4b + 3.
#pragma GCC unroll 2
    for (int b = 0; b < 2; ++b) {
      u[4 * b + 0] = _mm256_shuffle_ps(t[4 * b], t[4 * b + 2], 0x44);
      u[4 * b + 1] = _mm256_shuffle_ps(t[4 * b], t[4 * b + 2], 0xEE);
      u[4 * b + 2] = _mm256_shuffle_ps(t[4 * b + 1], t[4 * b + 3], 0x44);
      u[4 * b + 3] = _mm256_shuffle_ps(t[4 * b + 1], t[4 * b + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      r[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
      r[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
  }
};
#endif

#if TORCHEXT_NEON
// 32 q registers, as many as AVX-512 has: its tiles, on 4-float vectors.
struct Neon {
  using R = float32x4_t;
  using M = int64_t;  // lanes [0, M) are on
  static constexpr int64_t kLanes = 4;
  static constexpr int kGemmRows = 6, kGemmVecs = 4, kChainRows = 8, kOuterRows = 4;

  static R zero() { return vdupq_n_f32(0.f); }
  static R set1(float x) { return vdupq_n_f32(x); }
  static R load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, R v) { vst1q_f32(p, v); }
  static R fma(R a, R b, R c) { return vfmaq_f32(c, a, b); }
  static R add(R a, R b) { return vaddq_f32(a, b); }
  static R mul(R a, R b) { return vmulq_f32(a, b); }
  // FMAX returns NaN when either operand is NaN.
  static R relu(R x) { return vmaxq_f32(zero(), x); }
  static R where_active(R r, R v) {
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(v), vcleq_f32(r, zero())));
  }
  static M first(int64_t n) { return n >= kLanes ? kLanes : n <= 0 ? 0 : n; }
  static R load_first(M m, const float* p) {
    if (m == kLanes) return vld1q_f32(p);
    float l[kLanes] = {0.f, 0.f, 0.f, 0.f};
    std::memcpy(l, p, sizeof(float) * size_t(m));
    return vld1q_f32(l);
  }
  static void store_first(float* p, M m, R v) {
    if (m == kLanes) return vst1q_f32(p, v);
    float l[kLanes];
    vst1q_f32(l, v);
    std::memcpy(p, l, sizeof(float) * size_t(m));
  }
  static R gather_first(M m, const float* p, int64_t stride) {
    float l[kLanes] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t i = 0; i < m; ++i) l[i] = p[i * stride];
    return vld1q_f32(l);
  }
  static void scatter_first(float* p, int64_t stride, M m, R v) {
    float l[kLanes];
    vst1q_f32(l, v);
    for (int64_t i = 0; i < m; ++i) p[i * stride] = l[i];
  }
  static void transpose(R r[4]) {
    const float32x4x2_t a = vtrnq_f32(r[0], r[1]), b = vtrnq_f32(r[2], r[3]);
    r[0] = vcombine_f32(vget_low_f32(a.val[0]), vget_low_f32(b.val[0]));
    r[1] = vcombine_f32(vget_low_f32(a.val[1]), vget_low_f32(b.val[1]));
    r[2] = vcombine_f32(vget_high_f32(a.val[0]), vget_high_f32(b.val[0]));
    r[3] = vcombine_f32(vget_high_f32(a.val[1]), vget_high_f32(b.val[1]));
  }
};
#endif

}  // namespace simd
}  // namespace cpu
}  // namespace torchext
