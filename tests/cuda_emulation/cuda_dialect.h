// The CUDA dialect the kernels use, on the host: each block's threads are
// host threads, __syncthreads a barrier among them, __syncwarp a barrier
// among a warp's 32, warp shuffles an exchange through memory between two
// such barriers; __shared__ arrays are one copy per kernel instantiation
// (blocks run one after another). Enough to check the kernels' indexing,
// bounds and barriers; nothing of the GPU's memory model or speed.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 gridDim, blockDim;

constexpr int kEmulatedWarp = 32;
constexpr int kEmulatedMaxThreads = 1024;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline uint64_t warp_exchange[kEmulatedMaxThreads];

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __syncwarp() { warp_barriers[threadIdx.x / kEmulatedWarp]->arrive_and_wait(); }

// The value of lane + offset (the caller's own past the warp's end), every
// lane of the warp taking part, as the full-mask shuffle requires.
template <typename T>
T __shfl_down_sync(unsigned /*full mask*/, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "one slot per lane");
  const int lane = int(threadIdx.x) % kEmulatedWarp;
  std::memcpy(&warp_exchange[threadIdx.x], &v, sizeof(T));
  __syncwarp();
  T out = v;
  if (lane + offset < kEmulatedWarp) std::memcpy(&out, &warp_exchange[threadIdx.x + offset], sizeof(T));
  __syncwarp();  // every lane has read before the next shuffle writes
  return out;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
alignas(16) inline unsigned char emulated_dynamic_shared[1 << 20];
#define TORCHEXT_DYNAMIC_SHARED(name) unsigned char* name = emulated_dynamic_shared

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

// Runs kernel(args...) over grid × threads, block after block: each host
// thread plays its thread of every block in turn, all of a block finishing
// (a barrier) before the next block starts.
template <typename Kernel, typename... Args>
void launch(int64_t grid, int threads, Kernel kernel, Args... args) {
  gridDim.x = unsigned(grid);
  blockDim.x = unsigned(threads);
  warp_barriers.clear();
  for (int w = 0; w < (threads + kEmulatedWarp - 1) / kEmulatedWarp; ++w)
    warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(kEmulatedWarp, threads - w * kEmulatedWarp)));
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([=, &barrier] {
      threadIdx.x = unsigned(t);
      for (int64_t b = 0; b < grid; ++b) {
        blockIdx.x = unsigned(b);
        kernel(args...);
        barrier.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
}

// bfloat16 as the hardware converts to it (cvt.rn.bf16.f32): to nearest
// even, overflowing to inf, and a NaN, whatever its payload, to the canonical
// NaN (a NaN with its payload in the low 16 bits must not become inf).
// Two bytes, as on the device, so that the kernels' shared-memory sizes
// (sizeof their staging arrays) are the device's.
struct __nv_bfloat16 {
  uint16_t bits;  // the top half of a float32
};
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    u = 0x7fff0000u;
  } else {
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  }
  return {uint16_t(u >> 16)};
}
inline float to_float(__nv_bfloat16 h) {
  const uint32_t u = uint32_t(h.bits) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
inline float to_float(float f) { return f; }

// The warp-level matrix operations of the tensor-core tiles: every thread of
// a warp holds (and computes) a whole 16 × 16 fragment, and the warp's stores
// write the same values.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16][16];
};
template <typename F>
void fill_fragment(F& f, float v) {
  for (auto& row : f.x)
    for (auto& e : row) e = v;
}
// Element (i, j) of the fragment's matrix at p[i * ld + j] (row_major) or
// p[i + j * ld] (col_major).
template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ld) {
  constexpr bool kColMajor = std::is_same_v<Layout, col_major>;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i][j] = to_float(kColMajor ? p[i + j * ld] : p[i * ld + j]);
}
template <typename D, typename A, typename B>
void mma_sync(D& d, const A& a, const B& b, const D& c) {
  D out;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i][j];
      for (int k = 0; k < 16; ++k) s += a.x[i][k] * b.x[k][j];
      out.x[i][j] = s;
    }
  d = out;
}
template <typename F>
void store_matrix_sync(float* p, const F& f, unsigned ld, layout_t) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) p[i * ld + j] = f.x[i][j];
}
}  // namespace wmma
}  // namespace nvcuda

using std::fma;
#define TORCHEXT_TENSOR_CORE_TILES 1
#define TORCHEXT_EMULATED_WMMA 1
