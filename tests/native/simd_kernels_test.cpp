// Standalone test of every SIMD kernel set this build and CPU can run (the
// sources are torch-free): the matrix product, the ReLU gradients and the narrow
// chain against float64 references, at sizes 1, primes and widths that are
// not multiples of the vector width. CI builds it natively and for aarch64
// (run under qemu-user): see .ci/run and scripts/cross_build_aarch64.sh.
#include "cpu/simd_kernels.h"
#include "cpu/simd_vec.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace torchext::cpu;

namespace {

int failures = 0;
std::mt19937 rng(1234);

std::vector<float> randn(int64_t n) {
  std::normal_distribution<float> dist;
  std::vector<float> v(static_cast<size_t>(std::max<int64_t>(n, 1)));
  for (float& x : v) x = dist(rng);
  return v;
}

// Quarters in [-1, 1]: x = W z is then exact in float32, so the reference's
// ReLU mask is the kernels' (no unit rounds across 0).
std::vector<float> quarters(int64_t n) {
  std::uniform_int_distribution<int> dist(-4, 4);
  std::vector<float> v(static_cast<size_t>(std::max<int64_t>(n, 1)));
  for (float& x : v) x = 0.25f * float(dist(rng));
  return v;
}

void expect_close(const char* set, const std::string& what, double got, double want, double scale) {
  if (std::fabs(got - want) <= 1e-5 * scale + 1e-6) return;
  if (++failures <= 20)
    std::printf("FAIL %s %s: got %.9g, want %.9g (scale %.3g)\n", set, what.c_str(), got, want, scale);
}

// relu: every element's sum, then relu; upper (square C only): the elements
// on or above the diagonal (those below are unspecified).
void test_gemm(const SimdKernels& k) {
  // (10, 11, 19: the 8 + 2, 8 + 3 row splits of the widest tiles)
  const int64_t sizes[] = {1, 2, 3, 5, 7, 10, 11, 13, 17, 19, 31, 33, 47};
  for (int variant = 0; variant < 24; ++variant)
    for (int64_t M : sizes)
      for (int64_t N : sizes)
        for (int64_t K : {int64_t(1), int64_t(6), int64_t(37), int64_t(300)}) {
          const int v = variant % 12;
          const GemmOptions o{(v & 1) != 0, (v & 2) != 0, v >= 4 && v < 8, v >= 8, variant >= 12};
          if (o.upper ? M != N : (M * 7 + N * 3 + K) % 3 != 0 && K != 300) continue;  // a third of the grid, all of K = 300
          const int64_t lda = (o.trans_a ? M : K) + 3, ldb = (o.trans_b ? K : N) + 5, ldc = N + 2;
          const std::vector<float> A = randn((o.trans_a ? K : M) * lda), B = randn((o.trans_b ? N : K) * ldb);
          std::vector<float> C = randn(M * ldc), C0 = C;
          k.gemm(o, M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc);
          for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < ldc; ++j) {
              const std::string at = "gemm M=" + std::to_string(M) + " N=" + std::to_string(N) +
                                     " K=" + std::to_string(K) + (o.trans_a ? " Aᵀ" : "") +
                                     (o.trans_b ? " Bᵀ" : "") +
                                     (o.accumulate ? " +=" : "") + (o.relu ? " relu" : "") +
                                     (o.upper ? " upper" : "") + " (" + std::to_string(i) + "," +
                                     std::to_string(j) + ")";
              if (j >= N) {  // the padding past each row is not touched
                expect_close(k.name, at + " padding", C[i * ldc + j], C0[i * ldc + j], 0);
                continue;
              }
              if (o.upper && i > j) continue;
              double want = o.accumulate ? C0[i * ldc + j] : 0.0, scale = std::fabs(want);
              for (int64_t p = 0; p < K; ++p) {
                const double a = o.trans_a ? A[p * lda + i] : A[i * lda + p];
                const double b = o.trans_b ? B[j * ldb + p] : B[p * ldb + j];
                want += a * b;
                scale += std::fabs(a * b);
              }
              expect_close(k.name, at, C[i * ldc + j], o.relu ? std::max(want, 0.0) : want, scale);
            }
        }
}

// 64-byte-aligned zeroed floats, as the library's workspace gives them.
struct Aligned {
  explicit Aligned(int64_t n) : raw(size_t(n) + 16, 0.f) {}
  float* get() { return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t{63}); }
  std::vector<float> raw;
};

// Exactly the generic loop's values (the same two roundings per element), with
// zeros, negatives, infinities and NaN in r, q and g; either output alone;
// outputs with rows wider than k, whose padding stays untouched.
void test_relu_grads(const SimdKernels& k) {
  const float specials[] = {0.f, -0.f, -1.5f, INFINITY, -INFINITY, NAN};
  for (int64_t n : {1, 3})
    for (int64_t width : {1, 5, 8, 13, 16, 17, 33})
      for (int64_t pad : {0, 3, 16}) {
        const int64_t ldo = width + pad;
        std::vector<float> q = randn(n * width), r = randn(n * width), g = randn(n);
        for (int64_t e = 0; e < n * width; e += 3) r[e] = specials[e % 6], q[(e + 1) % (n * width)] = specials[(e + 2) % 6];
        g[0] = n > 1 ? NAN : g[0];
        for (int outputs = 1; outputs < 4; ++outputs) {
          std::vector<float> p(n * ldo, 7.f), gr(n * ldo, 7.f);
          k.relu_grads(n, width, g.data(), q.data(), r.data(), outputs & 1 ? p.data() : nullptr,
                       outputs & 2 ? gr.data() : nullptr, ldo);
          for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < ldo; ++j) {
              const int64_t e = i * width + j, o = i * ldo + j;
              const bool live = j < width;
              const float want_p = live && outputs & 1 ? (r[e] <= 0.f ? 0.f : (2.f * g[i]) * q[e]) : 7.f;
              const float want_gr = live && outputs & 2 ? g[i] * r[e] : 7.f;
              const bool same = (std::isnan(p[o]) ? std::isnan(want_p) : p[o] == want_p) &&
                                (std::isnan(gr[o]) ? std::isnan(want_gr) : gr[o] == want_gr);
              if (!same && ++failures <= 20)
                std::printf("FAIL %s relu_grads n=%lld k=%lld ldo=%lld (%lld,%lld): p %g want %g, gr %g want %g\n",
                            k.name, static_cast<long long>(n), static_cast<long long>(width),
                            static_cast<long long>(ldo), static_cast<long long>(i), static_cast<long long>(j),
                            p[o], want_p, gr[o], want_gr);
            }
        }
      }
}

void test_narrow(const SimdKernels& k) {
  for (int64_t d : {1, 3, 16, 17, 40})
    for (int64_t kk : {1, 5, 8, 13, 32})
      for (int64_t n : {1, 7, 129, 300})
        for (bool saved : {false, true}) {
          if ((d + kk + n) % 2 == 0 && n != 129) continue;  // half the grid, all of n = 129
          const std::string at = "narrow d=" + std::to_string(d) + " k=" + std::to_string(kk) +
                                 " n=" + std::to_string(n) + (saved ? " saved" : " recomputed");
          const std::vector<float> z = quarters(n * d), W = quarters(kk * d), Q = randn(kk * kk), g = randn(n);
          const NarrowWeights w(d, kk, W.data(), Q.data());
          const int64_t S = kNarrowBlock;
          Aligned zT(w.Dp * S), rT(w.Kp * S), qT(w.Kp * S), pT(w.Kp * S), grT(w.Kp * S), gb(S),
              dW(w.Kp * w.Dp * k.lanes), gram(w.Kp * w.Kp * k.lanes);
          const NarrowBuffers b{zT.get(), rT.get(), qT.get(), pT.get(), grT.get(), gb.get(), dW.get(), gram.get()};
          // Stale data before each real call, as an earlier block leaves it: a
          // full block of NaN samples through the same buffers, then the sums
          // zeroed as the library's flush does. No padding lane may see it.
          auto poison = [&] {
            const std::vector<float> zn(static_cast<size_t>(S * d), NAN), gn(static_cast<size_t>(S), NAN);
            std::vector<float> fn(static_cast<size_t>(S)), rn(static_cast<size_t>(S * kk)), qn(rn), dzn(zn);
            k.narrow_forward(w, zn.data(), S, fn.data(), rn.data(), qn.data(), b);
            k.narrow_backward(w, zn.data(), gn.data(), nullptr, nullptr, S, true, true, dzn.data(), b);
            std::fill(dW.raw.begin(), dW.raw.end(), 0.f);
            std::fill(gram.raw.begin(), gram.raw.end(), 0.f);
          };
          std::vector<float> f(static_cast<size_t>(n)), r(static_cast<size_t>(n * kk)), q(static_cast<size_t>(n * kk)), dz(static_cast<size_t>(n * d));
          poison();
          k.narrow_forward(w, z.data(), n, f.data(), saved ? r.data() : nullptr, saved ? q.data() : nullptr, b);
          poison();
          k.narrow_backward(w, z.data(), g.data(), saved ? r.data() : nullptr, saved ? q.data() : nullptr, n,
                            true, true, dz.data(), b);
          std::vector<double> wdW(static_cast<size_t>(kk * d), 0.0), wG(static_cast<size_t>(kk * kk), 0.0), sdW(wdW), sG(wG);
          for (int64_t s = 0; s < n; ++s) {
            std::vector<double> rs(static_cast<size_t>(kk)), qs(static_cast<size_t>(kk), 0.0), qscale(static_cast<size_t>(kk), 0.0), ps(static_cast<size_t>(kk));
            for (int64_t i = 0; i < kk; ++i) {
              double x = 0;
              for (int64_t j = 0; j < d; ++j) x += double(W[i * d + j]) * z[s * d + j];
              rs[i] = x > 0 ? x : 0;
            }
            double fs = 0, fscale = 0;
            for (int64_t i = 0; i < kk; ++i) {
              for (int64_t j = 0; j < kk; ++j) {
                qs[i] += double(Q[i * kk + j]) * rs[j];
                qscale[i] += std::fabs(Q[i * kk + j] * rs[j]);
              }
              fs += rs[i] * qs[i];
              for (int64_t j = 0; j < kk; ++j) fscale += std::fabs(rs[i] * Q[i * kk + j] * rs[j]);
            }
            expect_close(k.name, at + " f", f[s], fs, fscale);
            for (int64_t i = 0; i < kk; ++i) {
              ps[i] = rs[i] > 0 ? 2.0 * g[s] * qs[i] : 0.0;
              if (saved) {
                expect_close(k.name, at + " r", r[s * kk + i], rs[i], 0);
                expect_close(k.name, at + " q", q[s * kk + i], qs[i], qscale[i]);
              }
              for (int64_t j = 0; j < d; ++j) {
                wdW[i * d + j] += ps[i] * z[s * d + j];
                sdW[i * d + j] += 2 * std::fabs(g[s] * z[s * d + j]) * qscale[i];
              }
              for (int64_t j = 0; j < kk; ++j) {
                wG[i * kk + j] += g[s] * rs[i] * rs[j];
                sG[i * kk + j] += std::fabs(g[s] * rs[i] * rs[j]);
              }
            }
            for (int64_t j = 0; j < d; ++j) {
              double want = 0, scale = 0;
              for (int64_t i = 0; i < kk; ++i) {
                want += double(W[i * d + j]) * ps[i];
                scale += std::fabs(W[i * d + j]) * 2 * std::fabs(g[s]) * qscale[i];
              }
              expect_close(k.name, at + " dz", dz[s * d + j], want, scale);
            }
          }
          auto lane_sum = [&](const float* v) {
            double s = 0;
            for (int64_t l = 0; l < k.lanes; ++l) s += v[l];
            return s;
          };
          for (int64_t i = 0; i < kk; ++i) {
            for (int64_t j = 0; j < d; ++j)
              expect_close(k.name, at + " dW", lane_sum(dW.get() + (i * w.Dp + j) * k.lanes), wdW[i * d + j],
                           sdW[i * d + j] * 4);
            for (int64_t j = i; j < kk; ++j)
              expect_close(k.name, at + " gram", lane_sum(gram.get() + (i * w.Kp + j) * k.lanes), wG[i * kk + j],
                           sG[i * kk + j] * 4);
          }
        }
}

// Every element of a product (stored as is, or its ReLU for odd M) is the
// same FMA sequence over K in every set, and whether B is given transposed
// or not, so the sets' products agree bit for bit (the README says so).
void test_products_agree_bitwise(const std::vector<const SimdKernels*>& sets) {
  for (int64_t M : {1, 7, 13, 64})
    for (int64_t N : {3, 16, 37})
      for (int64_t K : {5, 300}) {
        const std::vector<float> A = randn(M * K), B = randn(K * N);
        std::vector<float> Bt(static_cast<size_t>(N * K));
        for (int64_t p = 0; p < K; ++p)
          for (int64_t j = 0; j < N; ++j) Bt[j * K + p] = B[p * N + j];
        std::vector<float> first;
        for (const SimdKernels* k : sets)
          for (bool trans_b : {false, true}) {
            std::vector<float> C(static_cast<size_t>(M * N));
            GemmOptions o{false, false, /*relu=*/M % 2 == 1};
            o.trans_b = trans_b;
            k->gemm(o, M, N, K, A.data(), K, trans_b ? Bt.data() : B.data(), trans_b ? K : N, C.data(), N);
            if (first.empty()) first = C;
            else if (std::memcmp(first.data(), C.data(), sizeof(float) * C.size()) != 0 && ++failures <= 20)
              std::printf("FAIL %s and %s%s products differ (M=%lld N=%lld K=%lld)\n", sets[0]->name, k->name,
                          trans_b ? " (B transposed)" : "", static_cast<long long>(M),
                          static_cast<long long>(N), static_cast<long long>(K));
          }
      }
}

bool runs_here(const char* name) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (std::string(name) == "avx512") return __builtin_cpu_supports("avx512f");
  if (std::string(name) == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(name) == "neon";
}

}  // namespace

int main() {
  int tested = 0;
  std::vector<const SimdKernels*> runnable;
  for (const SimdKernels* k : {avx512_kernels(), avx2_kernels(), neon_kernels()}) {
    if (k == nullptr) continue;
    if (!runs_here(k->name)) {
      std::printf("%s: compiled, not runnable on this CPU: skipped\n", k->name);
      continue;
    }
    const int before = failures;
    test_gemm(*k);
    test_relu_grads(*k);
    test_narrow(*k);
    std::printf("%s (%lld lanes): %s\n", k->name, static_cast<long long>(k->lanes),
                failures == before ? "gemm, relu_grads and narrow chain match float64" : "FAILED");
    ++tested;
    runnable.push_back(k);
  }
  if (runnable.size() > 1) {
    const int before = failures;
    test_products_agree_bitwise(runnable);
    std::printf("products of %zu sets agree bit for bit: %s\n", runnable.size(), failures == before ? "yes" : "NO");
  }
  if (tested == 0) {
    std::printf("no SIMD kernel set runs here\n");
    return 1;
  }
  return failures == 0 ? 0 : 1;
}
