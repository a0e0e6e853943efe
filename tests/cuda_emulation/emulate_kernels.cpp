// The fused CUDA kernels (csrc/cuda/quadratic_kernels.cuh: the quadratic
// plan on SIMT and on tensor-core tiles; csrc/cuda/direct_kernels.cuh: the
// direct plan's small-batch backward) compiled as plain C++ and run on the
// CPU: each block's threads are host threads, __syncthreads is a barrier
// among them, __shared__ arrays are one copy per kernel instantiation
// (blocks run one after another). This checks
// the kernels' indexing, bounds and barriers — not the GPU's memory model or
// speed — against float64 loops, on shapes around the tile edges, with every
// output poisoned (NaN) first so that an element no thread wrote shows.
//
// Build and run: tests/test_cuda_emulation.py (g++ -std=c++20 -pthread).
// Exit status 0 and "ok" when every check holds.
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <thread>
#include <vector>

// --- the CUDA dialect the kernels use, on the host ---------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local dim3 threadIdx, blockIdx;
dim3 gridDim, blockDim;
std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)
alignas(16) unsigned char emulated_dynamic_shared[1 << 20];
#define TORCHEXT_DYNAMIC_SHARED(name) unsigned char* name = emulated_dynamic_shared

// bfloat16 and the warp-level matrix operations of the tensor-core tiles:
// every thread of a warp holds (and computes) a whole 16 × 16 fragment, and
// the warp's stores write the same values.
struct __nv_bfloat16 {
  float value;  // rounded to bfloat16's precision
};
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x7fffu + ((u >> 16) & 1u);  // to nearest even
  u &= 0xffff0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return {r};
}
inline float to_float(__nv_bfloat16 h) { return h.value; }
inline float to_float(float f) { return f; }

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
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
template <typename F, typename P>
void load_matrix_sync(F& f, const P* p, unsigned ld) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.x[i][j] = to_float(p[i * ld + j]);
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
#include "../../csrc/cuda/quadratic_kernels.cuh"
#include "../../csrc/cuda/direct_kernels.cuh"

namespace q = torchext::quadratic;

// Runs kernel(args...) over grid × threads, block after block.
template <typename Kernel, typename... Args>
void launch(int64_t grid, int threads, Kernel kernel, Args... args) {
  gridDim.x = unsigned(grid);
  blockDim.x = unsigned(threads);
  for (int64_t b = 0; b < grid; ++b) {
    std::barrier<> barrier(threads);
    block_barrier = &barrier;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        blockIdx.x = unsigned(b);
        threadIdx.x = unsigned(t);
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

int failures = 0;

template <typename T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want,
                  double tol) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(double(got[i]))) {
      std::printf("FAIL %s: element %zu not written (NaN)\n", what, i);
      ++failures;
      return;
    }
    num += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    den += want[i] * want[i];
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (!(err <= tol)) {
    std::printf("FAIL %s: relative error %.3g > %.1g\n", what, err, tol);
    ++failures;
  }
}

// kTensorCores: the bfloat16-staged tiles (T = float); their operands are
// rounded to bfloat16, hence the looser bound. kWide: 128 × 128 tiles for the
// backward's dW and Gram blocks.
template <typename T, bool kTensorCores = false, bool kWide = false>
void check_shape(int64_t N, int64_t d, int64_t k, int64_t g_stride, int64_t grid_cap,
                 int64_t partitions, std::mt19937& rng) {
  const double tol = kTensorCores ? 3e-2 : sizeof(T) == 8 ? 1e-12 : 1e-5;
  std::normal_distribution<double> normal;
  auto random = [&](size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = T(normal(rng));
    return v;
  };
  const std::vector<T> z = random(N * d), W = random(k * d), Qraw = random(k * k),
                       g = random(g_stride == 0 ? 1 : N);
  std::vector<T> Q(k * k);
  for (int64_t i = 0; i < k; ++i)  // symmetric, as Mᵀ diag(a) M is
    for (int64_t j = 0; j < k; ++j) Q[i * k + j] = T(0.5) * (Qraw[i * k + j] + Qraw[j * k + i]);

  // float64 reference
  std::vector<double> r_ref(N * k), q_ref(N * k), f_ref(N), p_ref(N * k);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t c = 0; c < d; ++c) x += double(z[n * d + c]) * double(W[i * d + c]);
      r_ref[n * k + i] = x > 0 ? x : 0;
    }
    double f = 0;
    for (int64_t i = 0; i < k; ++i) {
      double qi = 0;
      for (int64_t j = 0; j < k; ++j) qi += double(Q[i * k + j]) * r_ref[n * k + j];
      q_ref[n * k + i] = qi;
      f += r_ref[n * k + i] * qi;
    }
    f_ref[n] = f;
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();

  // forward, saving r and q
  std::vector<T> f(N, nan), r(N * k, nan), qv(N * k, nan);
  const int64_t grid = std::max<int64_t>(1, std::min(q::tiles_of(N), grid_cap));
  launch(grid, q::tiles::kThreads, q::quadratic_forward_kernel<T, kTensorCores>, z.data(), W.data(), Q.data(),
         f.data(), r.data(), qv.data(), N, d, k);
  expect_close("forward f", f, f_ref, tol);
  expect_close("forward r", r, r_ref, tol);
  expect_close("forward q", qv, q_ref, tol);
  // forward, f only
  std::vector<T> f2(N, nan);
  launch(grid, q::tiles::kThreads, q::quadratic_forward_kernel<T, kTensorCores>, z.data(), W.data(), Q.data(),
         f2.data(), static_cast<T*>(nullptr), static_cast<T*>(nullptr), N, d, k);
  expect_close("forward f (not saving)", f2, f_ref, tol);

  // backward from the kernel's own r and q
  std::vector<double> dW_ref(k * d, 0), G_ref(k * k, 0), dz_ref(N * d, 0);
  for (int64_t n = 0; n < N; ++n) {
    const double gn = double(g[g_stride * n]);
    for (int64_t i = 0; i < k; ++i) {
      const double p = double(r[n * k + i]) <= 0 ? 0 : 2 * gn * double(qv[n * k + i]);
      for (int64_t c = 0; c < d; ++c) {
        dW_ref[i * d + c] += p * double(z[n * d + c]);
        dz_ref[n * d + c] += p * double(W[i * d + c]);
      }
      for (int64_t j = 0; j < k; ++j) G_ref[i * k + j] += gn * double(r[n * k + i]) * double(r[n * k + j]);
    }
  }
  std::vector<T> dW_parts(partitions * k * d, nan), gram_parts(partitions * k * k, nan),
      dz(N * d, nan), dW(k * d, nan), G(k * k, nan);
  q::QuadraticBackwardArgs<T> a{};
  a.z = z.data(), a.W = W.data(), a.g = g.data(), a.r = r.data(), a.q = qv.data();
  a.g_stride = g_stride;
  a.dW_parts = dW_parts.data(), a.gram_parts = gram_parts.data(), a.dz = dz.data();
  a.N = N, a.d = d, a.k = k;
  a.rows_per_partition = torchext::ceil_div(N, partitions);
  const int64_t tile = kWide ? 128 : 64;
  a.dW_blocks = partitions * q::tiles_of(k, tile) * q::tiles_of(d, tile);
  a.gram_blocks = partitions * q::tiles_of(k, tile) * (q::tiles_of(k, tile) + 1) / 2;
  a.dz_blocks = q::tiles_of(N) * q::tiles_of(d);
  launch(a.dW_blocks + a.gram_blocks + a.dz_blocks, q::tiles::kThreads,
         q::quadratic_backward_kernel<T, kTensorCores, kWide>, a);
  launch(3, 64, q::sum_partitions_kernel<T>, static_cast<const T*>(dW_parts.data()), partitions, k, d,
         false, dW.data());
  launch(2, 32, q::sum_partitions_kernel<T>, static_cast<const T*>(gram_parts.data()), partitions, k, k,
         true, G.data());
  expect_close("backward dW", dW, dW_ref, tol);
  expect_close("backward Gram", G, G_ref, tol);
  expect_close("backward dz", dz, dz_ref, tol);
}

// The direct plan's small-batch backward (direct_kernels.cuh); want: which of
// dz, dW, dV, dB, dA are requested.
template <typename T>
void check_small_direct(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell, int64_t g_stride,
                        const bool (&want)[5], std::mt19937& rng) {
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  std::normal_distribution<double> normal;
  auto random = [&](size_t n) {
    std::vector<T> v(n);
    for (auto& x : v) x = T(normal(rng));
    return v;
  };
  const std::vector<T> z = random(N * d), W = random(k * d), V = random(m * k), B = random(ell * m),
                       A = random(ell), g = random(g_stride == 0 ? 1 : N);
  std::vector<double> dz_ref(N * d, 0), dW_ref(k * d, 0), dV_ref(m * k, 0), dB_ref(ell * m, 0),
      dA_ref(ell, 0);
  for (int64_t n = 0; n < N; ++n) {
    const double gn = g[g_stride * n];
    std::vector<double> r(k), u(m, 0), y(ell, 0), e(ell), gu(m, 0), p(k, 0);
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t c = 0; c < d; ++c) x += double(W[i * d + c]) * z[n * d + c];
      r[i] = x > 0 ? x : 0;
    }
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < k; ++i) u[j] += double(V[j * k + i]) * r[i];
    for (int64_t l = 0; l < ell; ++l)
      for (int64_t j = 0; j < m; ++j) y[l] += double(B[l * m + j]) * u[j];
    for (int64_t l = 0; l < ell; ++l) {
      dA_ref[l] += gn * y[l] * y[l];
      e[l] = 2 * gn * A[l] * y[l];
      for (int64_t j = 0; j < m; ++j) {
        dB_ref[l * m + j] += e[l] * u[j];
        gu[j] += double(B[l * m + j]) * e[l];
      }
    }
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < k; ++i) {
        dV_ref[j * k + i] += gu[j] * r[i];
        p[i] += double(V[j * k + i]) * gu[j];
      }
    for (int64_t i = 0; i < k; ++i) {
      if (r[i] <= 0) p[i] = 0;
      for (int64_t c = 0; c < d; ++c) {
        dW_ref[i * d + c] += p[i] * z[n * d + c];
        dz_ref[n * d + c] += double(W[i * d + c]) * p[i];
      }
    }
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> dz(N * d, nan), dW(k * d, nan), dV(m * k, nan), dB(ell * m, nan), dA(ell, nan);
  torchext::direct::SmallBackwardArgs<T> a{};
  a.z = z.data(), a.W = W.data(), a.V = V.data(), a.B = B.data(), a.a = A.data(), a.g = g.data();
  a.g_stride = g_stride;
  a.dz = want[0] ? dz.data() : nullptr;
  a.dW = want[1] ? dW.data() : nullptr;
  a.dV = want[2] ? dV.data() : nullptr;
  a.dB = want[3] ? dB.data() : nullptr;
  a.dA = want[4] ? dA.data() : nullptr;
  a.N = N, a.d = d, a.k = k, a.m = m, a.ell = ell;
  launch(1, torchext::direct::kThreads, torchext::direct::small_backward_kernel<T>, a);
  if (want[0]) expect_close("small direct dz", dz, dz_ref, tol);
  if (want[1]) expect_close("small direct dW", dW, dW_ref, tol);
  if (want[2]) expect_close("small direct dV", dV, dV_ref, tol);
  if (want[3]) expect_close("small direct dB", dB, dB_ref, tol);
  if (want[4]) expect_close("small direct dA", dA, dA_ref, tol);
}

int main() {
  std::mt19937 rng(2026);
  struct Case {
    int64_t N, d, k, g_stride, grid_cap, partitions;
  };
  // Around the 64-wide tiles and 16-deep steps; a persistent grid smaller
  // than the tile count; several partitions, one of them short.
  const Case cases[] = {
      {1, 1, 1, 1, 4, 1},     {5, 3, 2, 0, 4, 1},    {64, 16, 64, 1, 1, 1},
      {65, 17, 65, 1, 2, 2},  {130, 33, 70, 0, 2, 3}, {200, 80, 129, 1, 8, 4},
  };
  for (const Case& c : cases) {
    check_shape<float>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, rng);
    check_shape<double>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, rng);
    check_shape<float, true>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, rng);
  }
  // The wide (128 × 128) weight-gradient tiles, around their edges.
  check_shape<float, false, true>(150, 128, 128, 1, 2, 2, rng);
  check_shape<float, false, true>(77, 200, 131, 0, 2, 3, rng);
  check_shape<float, false, true>(40, 300, 257, 1, 1, 1, rng);
  // The direct plan's small-batch backward: the seed's sizes, odd widths
  // wider than the block, a broadcast gradient, partial requests.
  const bool all[5] = {true, true, true, true, true}, head[5] = {false, false, false, true, true},
             only_v[5] = {false, false, true, false, false}, only_w[5] = {false, true, false, false, false};
  for (const bool* want : {all, head, only_v, only_w}) {
    const bool(&w)[5] = *reinterpret_cast<const bool(*)[5]>(want);
    check_small_direct<float>(1, 16, 16, 16, 16, 1, w, rng);
    check_small_direct<double>(5, 3, 300, 7, 2, 0, w, rng);
    check_small_direct<double>(3, 260, 5, 270, 9, 1, w, rng);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
