// The fused kernels of the quadratic plan (see two_layer_square_cuda.cu for
// where they sit in a call), on the tile product of tile_mma.cuh.
//
// Only <cstdint> and tile_mma.cuh here, nothing of CUDA's runtime or ATen:
// tests/cuda_emulation compiles this header as plain C++ — a block's threads
// as host threads, __syncthreads as a barrier — and checks every kernel's
// indexing and synchronisation against a float64 loop on machines without a
// GPU.
#pragma once

#include <cstdint>

#include "launch_plan.h"
#include "tile_mma.cuh"

// The kernel's dynamically sized shared memory (the launch's third argument).
#ifndef TORCHEXT_DYNAMIC_SHARED
#define TORCHEXT_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace torchext {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// torch.relu semantics: NaN stays NaN.
template <typename T>
__device__ __forceinline__ T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

namespace quadratic {

namespace tiles = cuda_tiles;
using tiles::Along;
using tiles::kLd;
using tiles::kPatch;
using tiles::kStep;
using tiles::kTile;

__host__ __device__ inline int64_t tiles_of(int64_t n, int64_t tile = kTile) { return ceil_div(n, tile); }
static_assert(kTile == launch::kForwardTileRows, "the host sizes the forward's r by its tile");

// The tile product a kernel runs on: SIMT fused multiply-adds in the compute
// type T, or (kTensorCores; T = float, for bfloat16 inputs) tensor
// cores on bfloat16-staged operands (tile_mma.cuh).
template <typename T, bool kTensorCores>
struct TileEngine;

template <typename T>
struct TileEngine<T, false> {
  using G = tiles::Tile64;
  struct Staging {
    T As[kStep][kLd];
    T Bs[kStep][kLd];
  };
  template <Along kA, Along kB, typename LoadA, typename LoadB>
  __device__ static void product(T (&acc)[kPatch][kPatch], Staging& st, int64_t p_begin,
                                 int64_t p_end, const LoadA& loadA, const LoadB& loadB) {
    tiles::tile_product<tiles::Tile64, kA, kB>(acc, st.As, st.Bs, p_begin, p_end, loadA, loadB);
  }
};

// The 128 × 128 SIMT tiles of the backward's weight-gradient blocks.
template <typename T>
struct WideEngine {
  using G = tiles::Tile128;
  struct Staging {
    T As[G::kStep][G::kLd];
    T Bs[G::kStep][G::kLd];
  };
  template <Along kA, Along kB, typename LoadA, typename LoadB>
  __device__ static void product(T (&acc)[G::kPatch][G::kPatch], Staging& st, int64_t p_begin,
                                 int64_t p_end, const LoadA& loadA, const LoadB& loadB) {
    tiles::tile_product<G, kA, kB>(acc, st.As, st.Bs, p_begin, p_end, loadA, loadB);
  }
};

#if defined(TORCHEXT_TENSOR_CORE_TILES)
template <>
struct TileEngine<float, true> {
  using G = tiles::Tile64;
  using Staging = tiles::tc::Staging;
  template <Along kA, Along kB, typename LoadA, typename LoadB>
  __device__ static void product(float (&acc)[kPatch][kPatch], Staging& st, int64_t p_begin,
                                 int64_t p_end, const LoadA& loadA, const LoadB& loadB) {
    tiles::tc::tile_product<kA, kB>(acc, st, p_begin, p_end, loadA, loadB);
  }
};
#endif

// p = 2 g q where not r <= 0, else 0: threshold_backward, as on the CPU.
template <typename T>
__device__ __forceinline__ T relu_grad(T g, T q, T r) {
  const T t = g * q;  // 2 g q as t + t: 2 g overflows first for g near the limit
  return r <= T(0) ? T(0) : t + t;
}

// Four consecutive elements as 16-byte accesses (p 16-byte aligned): a
// warp's quarter then covers 128 contiguous bytes, where 4-byte accesses at a
// 16-byte stride would meet in the same banks.
__device__ __forceinline__ void load4(const float* p, float* v) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
}
__device__ __forceinline__ void load4(const double* p, double* v) {
  const double2 lo = reinterpret_cast<const double2*>(p)[0];
  const double2 hi = reinterpret_cast<const double2*>(p)[1];
  v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
}
__device__ __forceinline__ void store4(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = float4{v[0], v[1], v[2], v[3]};
}
__device__ __forceinline__ void store4(double* p, const double* v) {
  reinterpret_cast<double2*>(p)[0] = double2{v[0], v[1]};
  reinterpret_cast<double2*>(p)[1] = double2{v[2], v[3]};
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// p[0, n) = v[0, n), n <= 4; whole when `vector` (p then 16-byte aligned).
template <typename T>
__device__ __forceinline__ void store_upto4(T* p, const T* v, int64_t n, bool vector) {
  if (vector && n >= 4) {
    store4(p, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (j < n) p[j] = v[j];
}

// fn(i, j0, row, col) for each 4-column group of the thread's patch, patch
// row i and columns j0 .. j0 + 3, at tile row `row` and columns col .. col + 3
// (col = n0 + its tile column), where col < cols (the group may run past).
template <class G, typename Fn>
__device__ __forceinline__ void for_patch_groups(int64_t n0, int64_t cols, const Fn& fn) {
  static_assert(tiles::kGroup == 4, "groups move as load4/store4");
#pragma unroll
  for (int i = 0; i < G::kPatch; ++i) {
#pragma unroll
    for (int j0 = 0; j0 < G::kPatch; j0 += tiles::kGroup) {
      const int64_t col = n0 + G::col(j0);
      if (col < cols) fn(i, j0, int64_t(G::row(i)), col);
    }
  }
}

template <typename T, bool kTensorCores = false>
__global__ void __launch_bounds__(tiles::kThreads)
    quadratic_forward_kernel(const T* __restrict__ z, const T* __restrict__ W,
                             const T* __restrict__ Q, T* __restrict__ f, T* __restrict__ r_out,
                             T* __restrict__ q_out, int64_t N, int64_t d, int64_t k) {
  using Engine = TileEngine<T, kTensorCores>;
  __shared__ typename Engine::Staging st;
  __shared__ T f_parts[kTile][tiles::kLanes + 1];  // + 1: a row's reads hit distinct banks
  TORCHEXT_DYNAMIC_SHARED(shared_raw);
  T* r_s = reinterpret_cast<T*>(shared_raw);  // the tile's r: kTile × ld
  const int64_t ld = launch::forward_r_stride(k);
  // Rows of the saved r and q start 16-byte aligned only when k is a
  // multiple of 4 and the outputs are; else they move element by element.
  const bool vector_rows = k % 4 == 0 && aligned16(r_out) && aligned16(q_out);
  using G = tiles::Tile64;
  T acc[kPatch][kPatch];
  for (int64_t tile = blockIdx.x; tile < tiles_of(N); tile += gridDim.x) {
    const int64_t row0 = tile * kTile;
    // x = z Wᵀ and r = relu(x), 64 columns at a time (rows past N: z = 0).
    for (int64_t n0 = 0; n0 < k; n0 += kTile) {
      Engine::template product<Along::kDeep, Along::kDeep>(
          acc, st, 0, d,
          [&](int w, int64_t p) { return row0 + w < N ? z[(row0 + w) * d + p] : T(0); },
          [&](int w, int64_t p) { return n0 + w < k ? W[(n0 + w) * d + p] : T(0); });
      for_patch_groups<G>(n0, k, [&](int i, int j0, int64_t row, int64_t col) {
        T v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = relu(acc[i][j0 + j]);
        store4(r_s + row * ld + col, v);  // past k: the row's padding, never read
        if (r_out != nullptr && row0 + row < N)
          store_upto4(r_out + (row0 + row) * k + col, v, k - col, vector_rows);
      });
    }
    __syncthreads();  // r_s complete
    // q = r Qᵀ, 64 columns at a time; f = Σ_j r_j q_j in per-thread partial sums.
    T f_part[kPatch] = {};
    for (int64_t n0 = 0; n0 < k; n0 += kTile) {
      Engine::template product<Along::kDeep, Along::kDeep>(
          acc, st, 0, k, [&](int w, int64_t p) { return r_s[w * ld + p]; },
          [&](int w, int64_t p) { return n0 + w < k ? Q[(n0 + w) * k + p] : T(0); });
      for_patch_groups<G>(n0, k, [&](int i, int j0, int64_t row, int64_t col) {
        T r4[4];
        load4(r_s + row * ld + col, r4);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (col + j < k) f_part[i] += r4[j] * acc[i][j0 + j];
        if (q_out != nullptr && row0 + row < N)
          store_upto4(q_out + (row0 + row) * k + col, &acc[i][j0], k - col, vector_rows);
      });
    }
#pragma unroll
    for (int i = 0; i < kPatch; ++i) f_parts[G::row(i)][threadIdx.x % tiles::kLanes] = f_part[i];
    __syncthreads();
    if (threadIdx.x < kTile && row0 + threadIdx.x < N) {
      T sum = T(0);
      for (int t = 0; t < tiles::kLanes; ++t) sum += f_parts[threadIdx.x][t];
      f[row0 + threadIdx.x] = sum;
    }
    __syncthreads();  // the next tile rewrites r_s and f_parts
  }
}

// The backward's blocks, in launch order: dW (partition-major, then k × d
// tiles), Gram (partition-major, then the upper block triangle of k × k,
// row by row), dz (row tiles, then d tiles). Counts of zero skip a kind.
template <typename T>
struct QuadraticBackwardArgs {
  const T *z, *W, *g, *r, *q;
  int64_t g_stride;             // 1, or 0 for a broadcast gradient
  T *dW_parts, *gram_parts, *dz;  // partitions × k × d, partitions × k × k, N × d
  int64_t N, d, k;
  int64_t rows_per_partition;
  int64_t dW_blocks, gram_blocks, dz_blocks;
};

// The (it, jt), jt >= it, of upper-triangle tile number t of an n × n tiling.
__device__ __forceinline__ void upper_tile(int64_t t, int64_t n, int64_t& it, int64_t& jt) {
  it = 0;
  while (t >= n - it) {
    t -= n - it;
    ++it;
  }
  jt = it + t;
}

// out[(row0 + i) * ld + col0 + j] = the thread's patch, within rows × cols.
template <class G, typename T>
__device__ __forceinline__ void store_patch(const T (&acc)[G::kPatch][G::kPatch], T* out,
                                            int64_t ld, int64_t row0, int64_t rows, int64_t col0,
                                            int64_t cols) {
#pragma unroll
  for (int i = 0; i < G::kPatch; ++i) {
    const int64_t row = row0 + G::row(i);
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < G::kPatch; ++j) {
      const int64_t col = col0 + G::col(j);
      if (col < cols) out[row * ld + col] = acc[i][j];
    }
  }
}

// The weight-gradient blocks (dW, Gram) of one partition: one output tile
// each, of `Engine`'s geometry, summing over the partition's samples.
template <typename T, class Engine, typename Staging>
__device__ void weight_blocks(const QuadraticBackwardArgs<T>& a, int64_t b, Staging& st) {
  using G = typename Engine::G;
  const int64_t N = a.N, d = a.d, k = a.k, tile = G::kTile;
  T acc[G::kPatch][G::kPatch];
  if (b < a.dW_blocks) {  // dW[i][c] = Σ_n p[n][i] z[n][c] over one partition
    const int64_t per_part = tiles_of(k, tile) * tiles_of(d, tile);
    const int64_t part = b / per_part, t = b % per_part;
    const int64_t kt = (t / tiles_of(d, tile)) * tile, dt = (t % tiles_of(d, tile)) * tile;
    const int64_t n_begin = part * a.rows_per_partition;
    const int64_t n_end = n_begin + a.rows_per_partition < N ? n_begin + a.rows_per_partition : N;
    Engine::template product<Along::kWide, Along::kWide>(
        acc, st, n_begin, n_end,
        [&](int w, int64_t n) {
          return kt + w < k ? relu_grad(a.g[n * a.g_stride], a.q[n * k + kt + w], a.r[n * k + kt + w])
                            : T(0);
        },
        [&](int w, int64_t n) { return dt + w < d ? a.z[n * d + dt + w] : T(0); });
    store_patch<G>(acc, a.dW_parts + part * k * d, d, kt, k, dt, d);
    return;
  }
  b -= a.dW_blocks;  // G[i][j] = Σ_n g_n r[n][i] r[n][j], j's tile >= i's
  const int64_t per_part = tiles_of(k, tile) * (tiles_of(k, tile) + 1) / 2;
  const int64_t part = b / per_part;
  int64_t it, jt;
  upper_tile(b % per_part, tiles_of(k, tile), it, jt);
  it *= tile;
  jt *= tile;
  const int64_t n_begin = part * a.rows_per_partition;
  const int64_t n_end = n_begin + a.rows_per_partition < N ? n_begin + a.rows_per_partition : N;
  Engine::template product<Along::kWide, Along::kWide>(
      acc, st, n_begin, n_end,
      [&](int w, int64_t n) { return it + w < k ? a.g[n * a.g_stride] * a.r[n * k + it + w] : T(0); },
      [&](int w, int64_t n) { return jt + w < k ? a.r[n * k + jt + w] : T(0); });
  store_patch<G>(acc, a.gram_parts + part * k * k, k, it, k, jt, k);
}

// kWide: the dW and Gram blocks use 128 × 128 tiles (float32 SIMT only; the
// host counts their blocks in that tile), the dz blocks 64 × 64.
template <typename T, bool kTensorCores = false, bool kWide = false>
__global__ void __launch_bounds__(tiles::kThreads, kWide ? 2 : 1)
    quadratic_backward_kernel(const QuadraticBackwardArgs<T> a) {
  using Engine = TileEngine<T, kTensorCores>;
  __shared__ typename Engine::Staging st;
  int64_t b = blockIdx.x;  // the same for the whole block: branches are uniform
  if (b < a.dW_blocks + a.gram_blocks) {
    if constexpr (kWide) {
      __shared__ typename WideEngine<T>::Staging wide_st;
      weight_blocks<T, WideEngine<T>>(a, b, wide_st);
    } else {
      weight_blocks<T, Engine>(a, b, st);
    }
    return;
  }
  b -= a.dW_blocks + a.gram_blocks;
  if (b < a.dz_blocks) {  // dz[n][c] = Σ_i p[n][i] W[i][c]
    const int64_t N = a.N, d = a.d, k = a.k;
    const int64_t row0 = (b / tiles_of(d)) * kTile, dt = (b % tiles_of(d)) * kTile;
    T acc[kPatch][kPatch];
    Engine::template product<Along::kDeep, Along::kWide>(
        acc, st, 0, k,
        [&](int w, int64_t i) {
          const int64_t n = row0 + w;
          return n < N ? relu_grad(a.g[n * a.g_stride], a.q[n * k + i], a.r[n * k + i]) : T(0);
        },
        [&](int w, int64_t i) { return dt + w < d ? a.W[i * d + dt + w] : T(0); });
    store_patch<tiles::Tile64>(acc, a.dz, d, row0, N, dt, d);
  }
}

// out[e] = Σ_p parts[p][e] in partition order; mirror_upper: a rows × rows
// Gram whose partials hold the upper triangle, mirrored into the lower one.
template <typename T>
__global__ void sum_partitions_kernel(const T* __restrict__ parts, int64_t partitions,
                                      int64_t rows, int64_t cols, bool mirror_upper,
                                      T* __restrict__ out) {
  const int64_t elems = rows * cols;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < elems;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / cols, j = e % cols;
    const int64_t src = mirror_upper && i > j ? j * cols + i : e;
    T sum = parts[src];
    for (int64_t p = 1; p < partitions; ++p) sum += parts[p * elems + src];
    out[e] = sum;
  }
}

}  // namespace quadratic
}  // namespace torchext
