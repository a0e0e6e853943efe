// The one piece of tile arithmetic the fused CUDA kernels are built from: a
// block of 256 threads computes a 64 × 64 tile of C = Σ_p A(i, p) B(p, j),
// each thread a 4 × 4 patch of it in registers, with A and B staged through
// shared memory 16 values of p at a time. A and B are not matrices in memory
// but functions (i or j, p) -> value: the kernels build their operands while
// loading them (p = 2 g q ⊙ 1[r > 0], g ⊙ r, a zero outside the problem), so
// nothing but the inputs and the outputs crosses device memory.
//
// Sums run over p in increasing order, one fused multiply-add at a time, for
// every element alike: results do not depend on the launch configuration.
#pragma once

#include <cstdint>

namespace torchext {
namespace cuda_tiles {

constexpr int kThreads = 256;
constexpr int kTile = 64;    // output tile: kTile × kTile
constexpr int kStep = 16;    // values of p staged per step
constexpr int kPatch = 4;    // each thread: kPatch × kPatch outputs
constexpr int kLd = kTile + 4;  // staged row length (padding spreads banks)

static_assert((kTile / kPatch) * (kTile / kPatch) == kThreads, "one patch per thread");
static_assert((kStep * kTile) % kThreads == 0, "whole stage per thread count");

// Which way an operand runs along memory: along the tile's 64-wide index
// (kWide: e.g. z[n][dt + j] for fixed n) or along p (kDeep: e.g. z[row][p]).
// It decides how threads are mapped to the elements they stage, so that
// neighbouring threads read neighbouring addresses.
enum class Along { kWide, kDeep };

// The thread's patch: rows patch_row() + [0, kPatch), columns patch_col() + [0, kPatch).
__device__ __forceinline__ int patch_row() { return (threadIdx.x / (kTile / kPatch)) * kPatch; }
__device__ __forceinline__ int patch_col() { return (threadIdx.x % (kTile / kPatch)) * kPatch; }

// A step stages kStep × kTile values of each operand; each thread moves
// kPerThread of them: its it-th is (w, s) = staged_at<kAlong>(it).
constexpr int kPerThread = (kStep * kTile) / kThreads;

template <Along kAlong>
__device__ __forceinline__ void staged_at(int it, int& w, int& s) {
  const int e = threadIdx.x + it * kThreads;
  w = kAlong == Along::kDeep ? e / kStep : e % kTile;
  s = kAlong == Along::kDeep ? e % kStep : e / kTile;
}

// reg[it] = load(w, p0 + s) (zero for p0 + s >= p_end): the thread's share of
// a step, fetched into registers one step ahead, so that the loads are in
// flight while the previous step multiplies.
template <Along kAlong, typename R, typename Load>
__device__ __forceinline__ void fetch(R (&reg)[kPerThread], const Load& load, int64_t p0,
                                      int64_t p_end) {
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    int w, s;
    staged_at<kAlong>(it, w, s);
    const int64_t p = p0 + s;
    reg[it] = p < p_end ? R(load(w, p)) : R(0);
  }
}

// dst[s][w] = reg[it].
template <Along kAlong, typename T>
__device__ __forceinline__ void put(T (*dst)[kLd], const T (&reg)[kPerThread]) {
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    int w, s;
    staged_at<kAlong>(it, w, s);
    dst[s][w] = reg[it];
  }
}

// acc += As[s][patch rows]ᵀ Bs[s][patch cols] over the staged s.
template <typename T>
__device__ __forceinline__ void mma_step(T (&acc)[kPatch][kPatch], const T (*As)[kLd],
                                         const T (*Bs)[kLd]) {
  const int r0 = patch_row(), c0 = patch_col();
#pragma unroll
  for (int s = 0; s < kStep; ++s) {
    T a[kPatch], b[kPatch];
#pragma unroll
    for (int i = 0; i < kPatch; ++i) a[i] = As[s][r0 + i];
#pragma unroll
    for (int j = 0; j < kPatch; ++j) b[j] = Bs[s][c0 + j];
#pragma unroll
    for (int i = 0; i < kPatch; ++i)
#pragma unroll
      for (int j = 0; j < kPatch; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
}

template <typename T>
__device__ __forceinline__ void zero(T (&acc)[kPatch][kPatch]) {
#pragma unroll
  for (int i = 0; i < kPatch; ++i)
#pragma unroll
    for (int j = 0; j < kPatch; ++j) acc[i][j] = T(0);
}

// acc = Σ_{p in [p_begin, p_end)} A(i, p) B(p, j) for the thread's patch, with
// loadA(i, p) and loadB(j, p) returning the operands for p in range (and
// zero for an i or j outside the problem).
// Every thread of the block must call it (it synchronises the block).
template <Along kAlongA, Along kAlongB, typename T, typename LoadA, typename LoadB>
__device__ void tile_product(T (&acc)[kPatch][kPatch], T (*As)[kLd], T (*Bs)[kLd],
                             int64_t p_begin, int64_t p_end, const LoadA& loadA,
                             const LoadB& loadB) {
  zero(acc);
  if (p_begin >= p_end) return;
  T ra[kPerThread], rb[kPerThread];
  fetch<kAlongA>(ra, loadA, p_begin, p_end);
  fetch<kAlongB>(rb, loadB, p_begin, p_end);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kStep) {
    put<kAlongA>(As, ra);
    put<kAlongB>(Bs, rb);
    __syncthreads();
    if (p0 + kStep < p_end) {
      fetch<kAlongA>(ra, loadA, p0 + kStep, p_end);
      fetch<kAlongB>(rb, loadB, p0 + kStep, p_end);
    }
    mma_step(acc, As, Bs);
    __syncthreads();  // the next step overwrites As and Bs
  }
}

}  // namespace cuda_tiles
}  // namespace torchext

// ---------------------------------------------------------------------------
// The same tile product on tensor cores, for bfloat16/float16 inputs: the
// operands are staged as bfloat16 (its float32-sized exponent range keeps the
// per-call Q, which can be large, from overflowing, as float16 could), the
// products accumulate in float32 (wmma 16 × 16 × 16 fragments; each of the 8
// warps owns two of the tile's sixteen), and the result is handed back as the
// same per-thread 4 × 4 patch in float32, so the kernels' epilogues are the
// SIMT ones. Needs sm_80 or newer (the host picks it only there; older
// architectures compile a trap).
#if defined(TORCHEXT_TENSOR_CORE_TILES)
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <mma.h>
#endif
namespace torchext {
namespace cuda_tiles {
namespace tc {

using Half = __nv_bfloat16;
constexpr int kLdA = kStep + 8;  // 16-bit elements: wmma wants multiples of 8
constexpr int kLdB = kTile + 8;
constexpr int kLdC = kTile + 4;  // float

struct __align__(32) Staging {
  Half A[kTile][kLdA];  // A(i, p0 + s) at A[i][s]
  Half B[kStep][kLdB];  // B(p0 + s, j) at B[s][j]
  float C[kTile][kLdC];  // the finished tile
};

// A[w][s] (kTransposed: B[s][w]) = reg[it], as bfloat16.
template <bool kTransposed, Along kAlong>
__device__ __forceinline__ void put_half(Half* dst, int ld, const float (&reg)[kPerThread]) {
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    int w, s;
    staged_at<kAlong>(it, w, s);
    dst[kTransposed ? s * ld + w : w * ld + s] = __float2bfloat16(reg[it]);
  }
}

template <Along kAlongA, Along kAlongB, typename LoadA, typename LoadB>
__device__ void tile_product(float (&acc)[kPatch][kPatch], Staging& st, int64_t p_begin,
                             int64_t p_end, const LoadA& loadA, const LoadB& loadB) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(TORCHEXT_EMULATED_WMMA)
  namespace wmma = nvcuda::wmma;
  static_assert(kThreads == 256 && kTile == 64, "8 warps, two 16 x 16 fragments each");
  const int warp = threadIdx.x / 32;
  const int fr = (warp / 2) * 16, fc = (warp % 2) * 32;  // the warp's 16 x 32 of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
  wmma::fill_fragment(c[0], 0.f);
  wmma::fill_fragment(c[1], 0.f);
  float ra[kPerThread], rb[kPerThread];
  if (p_begin < p_end) {
    fetch<kAlongA>(ra, loadA, p_begin, p_end);
    fetch<kAlongB>(rb, loadB, p_begin, p_end);
  }
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kStep) {
    put_half<false, kAlongA>(&st.A[0][0], kLdA, ra);
    put_half<true, kAlongB>(&st.B[0][0], kLdB, rb);
    __syncthreads();
    if (p0 + kStep < p_end) {
      fetch<kAlongA>(ra, loadA, p0 + kStep, p_end);
      fetch<kAlongB>(rb, loadB, p0 + kStep, p_end);
    }
    wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, wmma::row_major> a;
    wmma::load_matrix_sync(a, &st.A[fr][0], kLdA);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, Half, wmma::row_major> b;
      wmma::load_matrix_sync(b, &st.B[0][fc + 16 * t], kLdB);
      wmma::mma_sync(c[t], a, b, c[t]);
    }
    __syncthreads();  // the next stage overwrites A and B
  }
  __syncthreads();  // every thread has read the previous product's C
#pragma unroll
  for (int t = 0; t < 2; ++t)
    wmma::store_matrix_sync(&st.C[fr][fc + 16 * t], c[t], kLdC, wmma::mem_row_major);
  __syncthreads();
  const int r0 = patch_row(), c0 = patch_col();
#pragma unroll
  for (int i = 0; i < kPatch; ++i)
#pragma unroll
    for (int j = 0; j < kPatch; ++j) acc[i][j] = st.C[r0 + i][c0 + j];
#else
  __trap();
#endif
}

}  // namespace tc
}  // namespace cuda_tiles
}  // namespace torchext
#endif  // TORCHEXT_TENSOR_CORE_TILES
