// The one piece of tile arithmetic the fused CUDA kernels are built from: a
// block of 256 threads computes a tile of C = Σ_p A(i, p) B(p, j), each thread
// a patch of it in registers, with A and B staged through shared memory a few
// values of p at a time. A and B are not matrices in memory but functions
// (i or j, p) -> value: the kernels build their operands while loading them
// (p = 2 g q ⊙ 1[r > 0], g ⊙ r, a zero outside the problem), so nothing but
// the inputs and the outputs crosses device memory.
//
// Two shapes (Geometry): 64 × 64 tiles, 16 values of p per step, 4 × 4 per
// thread (Tile64, every kernel), and 128 × 128 tiles, 8 per step, 8 × 8 per
// thread (Tile128: twice the multiply-adds per shared-memory load, for the
// backward's large weight-gradient products). A thread's patch rows are
// 4-row groups 64 apart, (i / 4) · 64 + ty · 4 + i % 4, and likewise its
// columns, so that a warp's 16-byte shared-memory reads hit distinct banks.
//
// Sums run over p in increasing order, one fused multiply-add at a time, for
// every element alike: results do not depend on the launch configuration.
#pragma once

#include <cstdint>

namespace torchext {
namespace cuda_tiles {

constexpr int kThreads = 256;
constexpr int kGroup = 4;        // a patch is made of 4 × 4 groups
constexpr int kGroupStride = 64; // ... 64 rows (columns) apart
constexpr int kLanes = 16;       // threads along a tile's rows (and columns)

template <int kTileSize, int kStepSize>
struct Geometry {
  static constexpr int kTile = kTileSize;        // output tile: kTile × kTile
  static constexpr int kStep = kStepSize;        // values of p staged per step
  static constexpr int kPatch = kTile / kLanes;  // each thread: kPatch × kPatch outputs
  static constexpr int kLd = kTile + 4;          // staged row length (float4-aligned)
  static constexpr int kPerThread = (kStep * kTile) / kThreads;  // staged values per thread
  static_assert(kPatch % kGroup == 0 && kTile == kGroupStride * (kPatch / kGroup), "patch groups");
  static_assert((kStep * kTile) % kThreads == 0, "whole stage per thread count");

  // Row (column) of the tile that the thread's patch row (column) i is.
  __device__ static __forceinline__ int row(int i) {
    return (i / kGroup) * kGroupStride + int(threadIdx.x / kLanes) * kGroup + i % kGroup;
  }
  __device__ static __forceinline__ int col(int j) {
    return (j / kGroup) * kGroupStride + int(threadIdx.x % kLanes) * kGroup + j % kGroup;
  }
};
using Tile64 = Geometry<64, 16>;
using Tile128 = Geometry<128, 8>;

// The 64 × 64 geometry's constants, as the kernels name them.
constexpr int kTile = Tile64::kTile;
constexpr int kStep = Tile64::kStep;
constexpr int kPatch = Tile64::kPatch;
constexpr int kLd = Tile64::kLd;
constexpr int kPerThread = Tile64::kPerThread;

// Which way an operand runs along memory: along the tile's wide index
// (kWide: e.g. z[n][dt + j] for fixed n) or along p (kDeep: e.g. z[row][p]).
// It decides how threads are mapped to the elements they stage, so that
// neighbouring threads read neighbouring addresses.
enum class Along { kWide, kDeep };

// The thread's it-th staged value of a step is (w, s).
template <class G, Along kAlong>
__device__ __forceinline__ void staged_at(int it, int& w, int& s) {
  const int e = threadIdx.x + it * kThreads;
  w = kAlong == Along::kDeep ? e / G::kStep : e % G::kTile;
  s = kAlong == Along::kDeep ? e % G::kStep : e / G::kTile;
}

// reg[it] = load(w, p0 + s) (zero for p0 + s >= p_end): the thread's share of
// a step, fetched into registers one step ahead, so that the loads are in
// flight while the previous step multiplies.
template <class G, Along kAlong, typename R, typename Load>
__device__ __forceinline__ void fetch(R (&reg)[G::kPerThread], const Load& load, int64_t p0,
                                      int64_t p_end) {
#pragma unroll
  for (int it = 0; it < G::kPerThread; ++it) {
    int w, s;
    staged_at<G, kAlong>(it, w, s);
    const int64_t p = p0 + s;
    reg[it] = p < p_end ? R(load(w, p)) : R(0);
  }
}

// dst[s][w] = reg[it].
template <class G, Along kAlong, typename T>
__device__ __forceinline__ void put(T (*dst)[G::kLd], const T (&reg)[G::kPerThread]) {
#pragma unroll
  for (int it = 0; it < G::kPerThread; ++it) {
    int w, s;
    staged_at<G, kAlong>(it, w, s);
    dst[s][w] = reg[it];
  }
}

// acc += As[s][patch rows]ᵀ Bs[s][patch cols] over the staged s.
template <class G, typename T>
__device__ __forceinline__ void mma_step(T (&acc)[G::kPatch][G::kPatch], const T (*As)[G::kLd],
                                         const T (*Bs)[G::kLd]) {
#pragma unroll
  for (int s = 0; s < G::kStep; ++s) {
    T a[G::kPatch], b[G::kPatch];
#pragma unroll
    for (int i = 0; i < G::kPatch; ++i) a[i] = As[s][G::row(i)];
#pragma unroll
    for (int j = 0; j < G::kPatch; ++j) b[j] = Bs[s][G::col(j)];
#pragma unroll
    for (int i = 0; i < G::kPatch; ++i)
#pragma unroll
      for (int j = 0; j < G::kPatch; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
}

// acc = Σ_{p in [p_begin, p_end)} A(i, p) B(p, j) for the thread's patch, with
// loadA(i, p) and loadB(j, p) returning the operands for p in range (and
// zero for an i or j outside the problem).
// Every thread of the block must call it (it synchronises the block).
template <class G, Along kAlongA, Along kAlongB, typename T, typename LoadA, typename LoadB>
__device__ void tile_product(T (&acc)[G::kPatch][G::kPatch], T (*As)[G::kLd], T (*Bs)[G::kLd],
                             int64_t p_begin, int64_t p_end, const LoadA& loadA,
                             const LoadB& loadB) {
#pragma unroll
  for (int i = 0; i < G::kPatch; ++i)
#pragma unroll
    for (int j = 0; j < G::kPatch; ++j) acc[i][j] = T(0);
  if (p_begin >= p_end) return;
  T ra[G::kPerThread], rb[G::kPerThread];
  fetch<G, kAlongA>(ra, loadA, p_begin, p_end);
  fetch<G, kAlongB>(rb, loadB, p_begin, p_end);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += G::kStep) {
    put<G, kAlongA>(As, ra);
    put<G, kAlongB>(Bs, rb);
    __syncthreads();
    if (p0 + G::kStep < p_end) {
      fetch<G, kAlongA>(ra, loadA, p0 + G::kStep, p_end);
      fetch<G, kAlongB>(rb, loadB, p0 + G::kStep, p_end);
    }
    mma_step<G>(acc, As, Bs);
    __syncthreads();  // the next step overwrites As and Bs
  }
}

}  // namespace cuda_tiles
}  // namespace torchext

// ---------------------------------------------------------------------------
// The same tile product on tensor cores, for bfloat16 inputs: the
// operands are staged as bfloat16 (its float32-sized exponent range keeps the
// per-call Q, which can be large, from overflowing, as float16 could), the
// products accumulate in float32 (wmma 16 × 16 × 16 fragments; each of the 8
// warps owns two of the tile's sixteen), and the result is handed back as the
// same per-thread 4 × 4 patch in float32, so the kernels' epilogues are the
// SIMT ones. Needs sm_80 or newer: older architectures compile a trap, and
// the host picks these tiles only where the device and the code the build
// has for it are sm_80 or newer (launch::use_tensor_core_tiles).
#if defined(TORCHEXT_TENSOR_CORE_TILES)
#include <type_traits>
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <mma.h>
#endif
namespace torchext {
namespace cuda_tiles {
namespace tc {

using Half = __nv_bfloat16;
// Row lengths in 16-bit elements (wmma wants multiples of 8; the 8 more keep
// a fragment load's rows in distinct banks).
constexpr int kLdDeep = kStep + 8;
constexpr int kLdWide = kTile + 8;
constexpr int kLdC = kTile + 4;  // float
constexpr int kStagedHalves = kTile * kLdDeep > kStep * kLdWide ? kTile * kLdDeep : kStep * kLdWide;

// Where an operand's staged value (w, s) sits: its layout follows the way the
// threads' loads run (Along), so that a warp's stores are consecutive and
// distinct banks: kDeep at [w][s], kWide at [s][w]. The wmma layouts follow:
// A(i, p) is row_major at [w][s], col_major at [s][w]; B(p, j) the other way.
template <Along kAlong>
struct Staged {
  static constexpr int kLd = kAlong == Along::kDeep ? kLdDeep : kLdWide;
  __device__ static __forceinline__ int at(int w, int s) {
    return kAlong == Along::kDeep ? w * kLd + s : s * kLd + w;
  }
};

struct __align__(32) Staging {
  Half A[kStagedHalves];  // A(i, p0 + s) at Staged<kAlongA>::at(i, s)
  Half B[kStagedHalves];  // B(p0 + s, j) at Staged<kAlongB>::at(j, s)
  float C[kTile][kLdC];   // the finished tile
};

template <Along kAlong>
__device__ __forceinline__ void put_half(Half* dst, const float (&reg)[kPerThread]) {
#pragma unroll
  for (int it = 0; it < kPerThread; ++it) {
    int w, s;
    staged_at<Tile64, kAlong>(it, w, s);
    dst[Staged<kAlong>::at(w, s)] = __float2bfloat16(reg[it]);
  }
}

template <Along kAlongA, Along kAlongB, typename LoadA, typename LoadB>
__device__ void tile_product(float (&acc)[kPatch][kPatch], Staging& st, int64_t p_begin,
                             int64_t p_end, const LoadA& loadA, const LoadB& loadB) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(TORCHEXT_EMULATED_WMMA)
  namespace wmma = nvcuda::wmma;
  static_assert(kThreads == 256 && kTile == 64, "8 warps, two 16 x 16 fragments each");
  using LayoutA = std::conditional_t<kAlongA == Along::kDeep, wmma::row_major, wmma::col_major>;
  using LayoutB = std::conditional_t<kAlongB == Along::kDeep, wmma::col_major, wmma::row_major>;
  const int warp = threadIdx.x / 32;
  const int fr = (warp / 2) * 16, fc = (warp % 2) * 32;  // the warp's 16 x 32 of the tile
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[2];
  wmma::fill_fragment(c[0], 0.f);
  wmma::fill_fragment(c[1], 0.f);
  float ra[kPerThread], rb[kPerThread];
  if (p_begin < p_end) {
    fetch<Tile64, kAlongA>(ra, loadA, p_begin, p_end);
    fetch<Tile64, kAlongB>(rb, loadB, p_begin, p_end);
  }
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kStep) {
    put_half<kAlongA>(st.A, ra);
    put_half<kAlongB>(st.B, rb);
    __syncthreads();
    if (p0 + kStep < p_end) {
      fetch<Tile64, kAlongA>(ra, loadA, p0 + kStep, p_end);
      fetch<Tile64, kAlongB>(rb, loadB, p0 + kStep, p_end);
    }
    wmma::fragment<wmma::matrix_a, 16, 16, 16, Half, LayoutA> a;
    wmma::load_matrix_sync(a, &st.A[Staged<kAlongA>::at(fr, 0)], Staged<kAlongA>::kLd);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, Half, LayoutB> b;
      wmma::load_matrix_sync(b, &st.B[Staged<kAlongB>::at(fc + 16 * t, 0)], Staged<kAlongB>::kLd);
      wmma::mma_sync(c[t], a, b, c[t]);
    }
    __syncthreads();  // the next stage overwrites A and B
  }
  __syncthreads();  // every thread has read the previous product's C
#pragma unroll
  for (int t = 0; t < 2; ++t)
    wmma::store_matrix_sync(&st.C[fr][fc + 16 * t], c[t], kLdC, wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPatch; ++i)
#pragma unroll
    for (int j = 0; j < kPatch; ++j) acc[i][j] = st.C[Tile64::row(i)][Tile64::col(j)];
#else
  __trap();
#endif
}

}  // namespace tc
}  // namespace cuda_tiles
}  // namespace torchext
#endif  // TORCHEXT_TENSOR_CORE_TILES
