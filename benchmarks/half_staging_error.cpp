// What float16 inputs lost on the CUDA tensor-core path, whose operands are
// staged in bfloat16 (float16 inputs take the float32 SIMT kernels since the
// first GPU run, 2026-12-04; bfloat16 inputs, exact in bfloat16, keep the
// tensor cores): the quadratic plan's fused forward (the kernel itself,
// run on the CPU through the emulation dialect of tests/cuda_emulation), on
// float16-valued random inputs, against float64; beside it the SIMT float32
// kernel and eager float16's chain (each op's result rounded to float16,
// float32 accumulation, as cuBLAS does), modelled here.
//
// Build and run (prints one line per path):
//   g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -o /tmp/half_staging_error \
//       benchmarks/half_staging_error.cpp && /tmp/half_staging_error
#include "../tests/cuda_emulation/cuda_dialect.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../csrc/cuda/launch_plan.h"
#include "../csrc/cuda/quadratic_kernels.cuh"

namespace q = torchext::quadratic;

float half(double v) { return float(_Float16(float(v))); }

double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / den);
}

int main() {
  const int64_t N = 512, d = 64, k = 64, m = 32, ell = 16;
  std::mt19937 rng(7);
  std::normal_distribution<double> normal;
  auto inputs = [&](int64_t n, double scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = half(normal(rng) * scale);
    return v;
  };
  const auto z = inputs(N * d, 1.0), W = inputs(k * d, 1 / std::sqrt(d)),
             V = inputs(m * k, 1 / std::sqrt(k)), B = inputs(ell * m, 1 / std::sqrt(m)),
             a = inputs(ell, 1.0);
  // Q = Mᵀ diag(a) M in float32 (the per-call product, cuBLAS on the GPU).
  std::vector<float> M(ell * k, 0), Q(k * k, 0);
  for (int64_t i = 0; i < ell; ++i)
    for (int64_t c = 0; c < k; ++c)
      for (int64_t j = 0; j < m; ++j) M[i * k + c] += B[i * m + j] * V[j * k + c];
  for (int64_t r = 0; r < k; ++r)
    for (int64_t c = 0; c < k; ++c)
      for (int64_t i = 0; i < ell; ++i) Q[r * k + c] += M[i * k + r] * a[i] * M[i * k + c];

  std::vector<double> f64(N), eager16(N), out16(N);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<double> r(k), r16(k), u(m), u16(m);
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      float x32 = 0;
      for (int64_t c = 0; c < d; ++c) {
        x += double(z[n * d + c]) * W[i * d + c];
        x32 += z[n * d + c] * W[i * d + c];
      }
      r[i] = std::max(x, 0.0);
      r16[i] = std::max(half(x32), 0.f);
    }
    double f = 0, f16acc = 0;
    for (int64_t j = 0; j < m; ++j) {
      u[j] = 0;
      float acc = 0;
      for (int64_t i = 0; i < k; ++i) {
        u[j] += V[j * k + i] * r[i];
        acc += V[j * k + i] * float(r16[i]);
      }
      u16[j] = half(acc);
    }
    for (int64_t i = 0; i < ell; ++i) {
      double y = 0;
      float acc = 0;
      for (int64_t j = 0; j < m; ++j) {
        y += B[i * m + j] * u[j];
        acc += B[i * m + j] * float(u16[j]);
      }
      f += a[i] * y * y;
      const float y16 = half(acc);
      f16acc += a[i] * double(half(y16 * y16));
    }
    f64[n] = f;
    eager16[n] = half(f16acc);
    out16[n] = half(f);
  }

  auto run = [&](auto kernel) {
    std::vector<float> f(N);
    const torchext::launch::DeviceLimits dev{48 << 10, 227 << 10, 228 << 10, 4, 90};
    launch(torchext::launch::quadratic_forward_grid(dev, N, 1), q::tiles::kThreads, kernel,
           z.data(), W.data(), Q.data(), f.data(), static_cast<float*>(nullptr),
           static_cast<float*>(nullptr), N, d, k);
    std::vector<double> as_half(N), exact(N);
    for (int64_t n = 0; n < N; ++n) {
      exact[n] = f[n];
      as_half[n] = half(f[n]);
    }
    return std::make_pair(exact, as_half);
  };
  const auto [tc, tc16] = run(q::quadratic_forward_kernel<float, true>);
  const auto [simt, simt16] = run(q::quadratic_forward_kernel<float, false>);
  std::printf("shape N=%lld d=%lld k=%lld m=%lld ell=%lld, float16-valued inputs; relative error of f vs float64\n",
              (long long)N, (long long)d, (long long)k, (long long)m, (long long)ell);
  std::printf("float16 rounding of the exact f alone      %.3g\n", rel_err(out16, f64));
  std::printf("eager float16 chain (modelled)             %.3g\n", rel_err(eager16, f64));
  std::printf("SIMT float32 kernel, f rounded to float16  %.3g\n", rel_err(simt16, f64));
  std::printf("tensor-core kernel (bfloat16 staging)      %.3g (f in float32: %.3g)\n",
              rel_err(tc16, f64), rel_err(tc, f64));
  return 0;
}
