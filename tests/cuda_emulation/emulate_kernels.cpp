// The fused CUDA kernels (csrc/cuda/quadratic_kernels.cuh: the quadratic
// plan on SIMT and on tensor-core tiles; csrc/cuda/direct_kernels.cuh: the
// direct plan's warp forward and small-batch backward) compiled as plain C++
// and run on the CPU (cuda_dialect.h), against float64 loops, on shapes
// around the tile edges, with every output poisoned first so that an element
// no thread wrote shows; and against the kernels as they were before the
// bank-conflict fixes (previous/), bitwise.
//
// Build and run: tests/test_cuda_emulation.py. Exit status 0 and "ok" when
// every check holds.
#include "cuda_dialect.h"

#include <cstdio>
#include <limits>
#include <random>

#include "../../csrc/cuda/launch_plan.h"
#include "../../csrc/cuda/quadratic_kernels.cuh"
#include "../../csrc/cuda/direct_kernels.cuh"
namespace previous {
#include "previous/quadratic_kernels.cuh"
#include "previous/direct_forward.cuh"
}  // namespace previous

namespace q = torchext::quadratic;
namespace pq = previous::torchext::quadratic;
namespace plan = torchext::launch;

int failures = 0;

void fail(const char* what, const char* why, size_t i) {
  std::printf("FAIL %s: %s (element %zu)\n", what, why, i);
  ++failures;
}

// Outputs start as this NaN: no arithmetic makes its payload.
template <typename T>
T poison() {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const Bits bits = sizeof(T) == 4 ? Bits(0x7fbadbadu) : Bits(0x7ff7badbadbadbadull);
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
template <typename T>
bool is_poison(T v) {
  const T p = poison<T>();
  return std::memcmp(&v, &p, sizeof(T)) == 0;
}

// got against the float64 reference: NaN where it is NaN, the same infinity
// where it is infinite, and within `tol` (relative, over the finite ones).
template <typename T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want,
                  double tol) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = double(got[i]);
    if (is_poison(got[i])) return fail(what, "not written", i);
    if (std::isnan(want[i]) || std::isinf(want[i])) {
      if (!(std::isnan(want[i]) ? std::isnan(g) : g == want[i])) return fail(what, "special value differs", i);
      continue;
    }
    if (!std::isfinite(g)) return fail(what, "not finite where the reference is", i);
    num += (g - want[i]) * (g - want[i]);
    den += want[i] * want[i];
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (!(err <= tol)) {
    std::printf("FAIL %s: relative error %.3g > %.1g\n", what, err, tol);
    ++failures;
  }
}

template <typename T>
void expect_bitwise(const char* what, const std::vector<T>& got, const std::vector<T>& previous) {
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &previous[i], sizeof(T)) != 0) return fail(what, "differs from the previous kernel", i);
}

template <typename T>
std::vector<T> random_values(size_t n, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = T(normal(rng));
  return v;
}

// A NaN with its payload in the low bits (bfloat16's rounding must keep it a
// NaN), +inf and -inf in three samples' inputs (fewer where N is smaller).
template <typename T>
void add_special_values(std::vector<T>& z, int64_t N, int64_t d) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const Bits low_nan = sizeof(T) == 4 ? Bits(0x7f800001u) : Bits(0x7ff0000000000001ull);
  std::memcpy(&z[0], &low_nan, sizeof(T));
  if (N > 1) z[1 * d + (2 % d)] = std::numeric_limits<T>::infinity();
  if (N > 2) z[2 * d + (d - 1)] = -std::numeric_limits<T>::infinity();
}

// torch.relu on the reference: NaN stays NaN.
double relu_ref(double x) { return x > 0 ? x : (x != x ? x : 0); }

// The quadratic plan's kernels, current and previous, on one shape.
// kTensorCores: the bfloat16-staged tiles (T = float); their operands are
// rounded to bfloat16, hence the looser bound. kWide: 128 × 128 tiles for the
// backward's dW and Gram blocks. grid_cap: a persistent grid that small.
template <typename T, bool kTensorCores = false, bool kWide = false>
void check_shape(int64_t N, int64_t d, int64_t k, int64_t g_stride, int64_t grid_cap,
                 int64_t partitions, bool specials, std::mt19937& rng) {
  const double tol = kTensorCores ? 3e-2 : sizeof(T) == 8 ? 1e-12 : 1e-5;
  std::vector<T> z = random_values<T>(N * d, rng);
  const std::vector<T> W = random_values<T>(k * d, rng), Qraw = random_values<T>(k * k, rng),
                       g = random_values<T>(g_stride == 0 ? 1 : N, rng);
  if (specials) add_special_values(z, N, d);
  std::vector<T> Q(k * k);
  for (int64_t i = 0; i < k; ++i)  // symmetric, as Mᵀ diag(a) M is
    for (int64_t j = 0; j < k; ++j) Q[i * k + j] = T(0.5) * (Qraw[i * k + j] + Qraw[j * k + i]);

  std::vector<double> r_ref(N * k), q_ref(N * k), f_ref(N);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t c = 0; c < d; ++c) x += double(z[n * d + c]) * double(W[i * d + c]);
      r_ref[n * k + i] = relu_ref(x);
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

  // forward, saving r and q, then f only; the previous kernels alike
  const plan::DeviceLimits dev{48 << 10, 48 << 10, 48 << 10, grid_cap, 90};
  const int64_t grid = plan::quadratic_forward_grid(dev, N, 1);
  auto forward = [&](auto kernel, bool save) {
    std::vector<T> f(N, poison<T>()), r(N * k, poison<T>()), qv(N * k, poison<T>());
    launch(grid, q::tiles::kThreads, kernel, z.data(), W.data(), Q.data(), f.data(),
           save ? r.data() : nullptr, save ? qv.data() : nullptr, N, d, k);
    return std::vector<std::vector<T>>{f, r, qv};
  };
  const auto out = forward(q::quadratic_forward_kernel<T, kTensorCores>, true);
  const auto before = forward(pq::quadratic_forward_kernel<T, kTensorCores>, true);
  const auto f_only = forward(q::quadratic_forward_kernel<T, kTensorCores>, false);
  const std::vector<T>&f = out[0], &r = out[1], &qv = out[2];
  expect_close("forward f", f, f_ref, tol);
  expect_close("forward r", r, r_ref, tol);
  expect_close("forward q", qv, q_ref, tol);
  expect_close("forward f (not saving)", f_only[0], f_ref, tol);
  expect_bitwise("forward f", f, before[0]);
  expect_bitwise("forward r", r, before[1]);
  expect_bitwise("forward q", qv, before[2]);
  expect_bitwise("forward f (not saving)", f_only[0], f);

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
  const plan::BackwardBlocks blocks =
      plan::quadratic_backward_blocks(N, d, k, partitions, kWide, true, true, true);
  auto backward = [&](auto kernel, auto args) {
    std::vector<T> dW_parts(partitions * k * d, poison<T>()), gram_parts(partitions * k * k, poison<T>()),
        dz(N * d, poison<T>());
    args.z = z.data(), args.W = W.data(), args.g = g.data(), args.r = r.data(), args.q = qv.data();
    args.g_stride = g_stride;
    args.dW_parts = dW_parts.data(), args.gram_parts = gram_parts.data(), args.dz = dz.data();
    args.N = N, args.d = d, args.k = k;
    args.rows_per_partition = blocks.rows_per_partition;
    args.dW_blocks = blocks.dW, args.gram_blocks = blocks.gram, args.dz_blocks = blocks.dz;
    launch(blocks.total(), q::tiles::kThreads, kernel, args);
    return std::vector<std::vector<T>>{dW_parts, gram_parts, dz};
  };
  const auto grads = backward(q::quadratic_backward_kernel<T, kTensorCores, kWide>, q::QuadraticBackwardArgs<T>{});
  const auto grads_before =
      backward(pq::quadratic_backward_kernel<T, kTensorCores, kWide>, pq::QuadraticBackwardArgs<T>{});
  std::vector<T> dW(k * d, poison<T>()), G(k * k, poison<T>());
  launch(3, 64, q::sum_partitions_kernel<T>, grads[0].data(), partitions, k, d, false, dW.data());
  launch(2, 32, q::sum_partitions_kernel<T>, grads[1].data(), partitions, k, k, true, G.data());
  expect_close("backward dW", dW, dW_ref, tol);
  expect_close("backward Gram", G, G_ref, tol);
  expect_close("backward dz", grads[2], dz_ref, tol);
  expect_bitwise("backward dW partitions", grads[0], grads_before[0]);
  expect_bitwise("backward Gram partitions", grads[1], grads_before[1]);
  expect_bitwise("backward dz", grads[2], grads_before[2]);
}

// The direct plan's warp forward, against float64 and, bitwise, against the
// kernel as the .cu had it; scratch: the per-warp buffers in global scratch
// (a device whose default shared memory is too small for them).
template <typename T>
void check_direct_forward(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell, bool scratch,
                          int64_t sms, bool specials, std::mt19937& rng) {
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  std::vector<T> z = random_values<T>(N * d, rng);
  const std::vector<T> W = random_values<T>(k * d, rng), V = random_values<T>(m * k, rng),
                       B = random_values<T>(ell * m, rng), A = random_values<T>(ell, rng);
  if (specials) add_special_values(z, N, d);
  std::vector<double> f_ref(N);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> r(k), u(m, 0);
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t c = 0; c < d; ++c) x += double(W[i * d + c]) * double(z[n * d + c]);
      r[i] = relu_ref(x);
    }
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < k; ++i) u[j] += double(V[j * k + i]) * r[i];
    double f = 0;
    for (int64_t l = 0; l < ell; ++l) {
      double y = 0;
      for (int64_t j = 0; j < m; ++j) y += double(B[l * m + j]) * u[j];
      f += double(A[l]) * y * y;
    }
    f_ref[n] = f;
  }
  const int64_t smem = scratch ? 0 : 48 << 10;
  const plan::DeviceLimits dev{smem, smem, smem, sms, 90};
  const plan::DirectForwardShared shared = plan::direct_forward_shared(dev, {0, 90}, k, m, sizeof(T));
  if (shared.scratch != scratch) return fail("direct forward", "scratch decision", 0);
  const int64_t grid = plan::direct_forward_grid(dev, N, 2);
  auto run = [&](auto kernel) {
    std::vector<T> f(N, poison<T>());
    std::vector<T> buf(scratch ? plan::direct_forward_scratch_elems(grid, k, m) : 0, poison<T>());
    launch(grid, torchext::direct::kForwardThreads, kernel, z.data(), W.data(), V.data(), B.data(),
           A.data(), f.data(), scratch ? buf.data() : nullptr, N, d, k, m, ell);
    return f;
  };
  const std::vector<T> f = run(torchext::direct::warp_forward_kernel<T>);
  expect_close("direct forward f", f, f_ref, tol);
  expect_bitwise("direct forward f", f, run(previous::torchext::previous_direct::forward_kernel<T>));
}

// The direct plan's small-batch backward; want: which of dz, dW, dV, dB, dA
// are requested.
template <typename T>
void check_small_direct(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell, int64_t g_stride,
                        const bool (&want)[5], std::mt19937& rng) {
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  const std::vector<T> z = random_values<T>(N * d, rng), W = random_values<T>(k * d, rng),
                       V = random_values<T>(m * k, rng), B = random_values<T>(ell * m, rng),
                       A = random_values<T>(ell, rng), g = random_values<T>(g_stride == 0 ? 1 : N, rng);
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
  std::vector<T> dz(N * d, poison<T>()), dW(k * d, poison<T>()), dV(m * k, poison<T>()),
      dB(ell * m, poison<T>()), dA(ell, poison<T>());
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

// The emulated conversion against the hardware's, value by value.
void check_bfloat16_rounding() {
  const struct {
    uint32_t in, out;
  } cases[] = {
      {0x7f800001u, 0x7fff0000u}, {0xff800001u, 0x7fff0000u}, {0x7fc00000u, 0x7fff0000u},
      {0x7fbfffffu, 0x7fff0000u}, {0x7f800000u, 0x7f800000u}, {0xff800000u, 0xff800000u},
      {0x7f7fffffu, 0x7f800000u}, {0x3f808000u, 0x3f800000u}, {0x3f818000u, 0x3f820000u},
      {0x3f808001u, 0x3f810000u}, {0x00000001u, 0x00000000u}, {0x80000000u, 0x80000000u},
  };
  for (const auto& c : cases) {
    float f;
    std::memcpy(&f, &c.in, 4);
    const float r = to_float(__float2bfloat16(f));
    uint32_t got;
    std::memcpy(&got, &r, 4);
    if (got != c.out) {
      std::printf("FAIL bfloat16 of 0x%08x: 0x%08x, the hardware gives 0x%08x\n", c.in, got, c.out);
      ++failures;
    }
  }
}

int main() {
  std::mt19937 rng(2026);
  check_bfloat16_rounding();
  struct Case {
    int64_t N, d, k, g_stride, grid_cap, partitions;
  };
  // Around the 64-wide tiles and 16-deep steps; a persistent grid smaller
  // than the tile count; several partitions, one of them short; widths not
  // a multiple of 4 (the forward's rows then move element by element).
  const Case cases[] = {
      {1, 1, 1, 1, 4, 1},    {5, 3, 2, 0, 4, 1},     {64, 16, 64, 1, 1, 1},
      {65, 17, 65, 1, 2, 2}, {130, 33, 70, 0, 2, 3}, {200, 80, 129, 1, 8, 4},
  };
  for (const Case& c : cases) {
    check_shape<float>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, false, rng);
    check_shape<double>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, false, rng);
    check_shape<float, true>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, false, rng);
  }
  // NaN and infinities in the inputs, on every engine.
  check_shape<float>(70, 17, 68, 1, 2, 2, true, rng);
  check_shape<double>(70, 17, 66, 0, 2, 2, true, rng);
  check_shape<float, true>(70, 17, 65, 1, 2, 2, true, rng);
  check_shape<float, true>(3, 5, 7, 0, 1, 1, true, rng);
  // The wide (128 × 128) weight-gradient tiles, around their edges.
  check_shape<float, false, true>(150, 128, 128, 1, 2, 2, false, rng);
  check_shape<float, false, true>(77, 200, 131, 0, 2, 3, false, rng);
  check_shape<float, false, true>(40, 300, 257, 1, 1, 1, false, rng);
  // The direct plan's warp forward: one sample, the seed's sizes, odd sizes,
  // k and ell past a warp and not a multiple of 4 or 32, N not a multiple of
  // a block's 4 samples, a grid smaller than the batch; in shared memory and
  // in global scratch.
  for (bool scratch : {false, true}) {
    check_direct_forward<float>(1, 1, 1, 1, 1, scratch, 1, false, rng);
    check_direct_forward<float>(1, 16, 16, 16, 16, scratch, 1, false, rng);
    check_direct_forward<double>(7, 3, 33, 7, 2, scratch, 1, false, rng);
    check_direct_forward<float>(37, 9, 70, 5, 40, scratch, 2, false, rng);
    check_direct_forward<double>(130, 20, 101, 33, 3, scratch, 3, false, rng);
    check_direct_forward<float>(9, 6, 35, 4, 3, scratch, 1, true, rng);
  }
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
