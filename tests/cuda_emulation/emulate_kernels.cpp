// The fused CUDA kernels (csrc/cuda/quadratic_kernels.cuh: the quadratic
// plan on SIMT and on tensor-core tiles; csrc/cuda/direct_kernels.cuh: the
// direct plan's warp forward and small-batch backward) compiled as plain C++
// and run on the CPU (cuda_dialect.h), against float64 references built from
// the inputs alone, on shapes around the tile edges, with every output
// poisoned first so that an element no thread wrote shows; the backward
// kernels under every partial request of gradients, an output not requested
// left untouched; and against the kernels as they were before the
// bank-conflict fixes (previous/), bitwise.
//
// Build and run: tests/test_cuda_emulation.py. Exit status 0 and "ok" when
// every check holds.
#include "cuda_dialect.h"

#include <array>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <unistd.h>

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

// The check running (kernel, shape, request), for the failure messages; a
// plain array, so that the fault handler can print it.
char context[256] = "";

void set_context(const char* format, ...) {
  va_list args;
  va_start(args, format);
  std::vsnprintf(context, sizeof context, format, args);
  va_end(args);
}

void fail(const char* what, const char* why, size_t i) {
  std::printf("FAIL %s [%s]: %s (element %zu)\n", what, context, why, i);
  ++failures;
}

// The small-batch backward takes a null pointer for a gradient not requested:
// a write there faults. Say so, and where, rather than die unexplained.
extern "C" void on_fault(int) {
  const char head[] = "FAIL a kernel wrote through a null pointer (an output not requested?) [";
  const char tail[] = "]\n";
  ssize_t ignored = write(STDOUT_FILENO, head, sizeof head - 1);
  ignored = write(STDOUT_FILENO, context, strlen(context));
  ignored = write(STDOUT_FILENO, tail, sizeof tail - 1);
  (void)ignored;
  _exit(1);
}

template <typename T>
const char* type_name() {
  return sizeof(T) == 4 ? "float32" : "float64";
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
    std::printf("FAIL %s [%s]: relative error %.3g > %.1g\n", what, context, err, tol);
    ++failures;
  }
}

// An output not requested: still poison everywhere.
template <typename T>
void expect_untouched(const char* what, const std::vector<T>& got) {
  for (size_t i = 0; i < got.size(); ++i)
    if (!is_poison(got[i])) return fail(what, "written though not requested", i);
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

// Normal values rounded to eighths, for z and W: bfloat16 holds them exactly
// and the sums of their products (multiples of 1/64, far below 2^18 at these
// widths) are exact in float32, so every engine computes x = W z exactly and
// the kernels' ReLU mask h is the reference's on every element. With
// arbitrary values a kernel's rounding could put an x near 0 on the other
// side, moving a whole 2 g q z term between kernel and reference: an error of
// order one in the backward, not of the rounding's order. (x is then
// sometimes exactly 0, where h must be 0.)
template <typename T>
std::vector<T> eighths(size_t n, std::mt19937& rng) {
  std::vector<T> v = random_values<T>(n, rng);
  for (auto& x : v) x = T(std::nearbyint(double(x) * 8) / 8);
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

// h ⊙ v as torch's threshold_backward forms it, from the reference's own r:
// 0 where r <= 0, whatever v is (NaN and infinities included), else v; a NaN
// x passes its NaN on.
double relu_grad_ref(double r, double v) { return r <= 0 ? 0 : v; }

// The quadratic plan, from its kernels' inputs z, W, Q and g alone, in
// float64: x = W z, r = relu(x), q = Q r, f = rᵀ q; p = 2 g h ⊙ q,
// dW = Σ_n p zᵀ, dz = Wᵀ p per sample, and the Gram Σ_n g r rᵀ (from which
// the host makes dV, dB and dA; Q = Vᵀ Bᵀ diag(a) B V is the host's too).
struct QuadraticReference {
  std::vector<double> r, q, f, dW, gram, dz;
};

template <typename T>
QuadraticReference quadratic_reference(const std::vector<T>& z, const std::vector<T>& W,
                                       const std::vector<T>& Q, const std::vector<T>& g,
                                       int64_t g_stride, int64_t N, int64_t d, int64_t k) {
  QuadraticReference ref{std::vector<double>(N * k), std::vector<double>(N * k),
                         std::vector<double>(N),     std::vector<double>(k * d, 0),
                         std::vector<double>(k * k, 0), std::vector<double>(N * d, 0)};
  for (int64_t n = 0; n < N; ++n) {
    double* r = &ref.r[n * k];
    double* qn = &ref.q[n * k];
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t c = 0; c < d; ++c) x += double(z[n * d + c]) * double(W[i * d + c]);
      r[i] = relu_ref(x);
    }
    double f = 0;
    for (int64_t i = 0; i < k; ++i) {
      double qi = 0;
      for (int64_t j = 0; j < k; ++j) qi += double(Q[i * k + j]) * r[j];
      qn[i] = qi;
      f += r[i] * qi;
    }
    ref.f[n] = f;
    const double gn = double(g[g_stride * n]);
    for (int64_t i = 0; i < k; ++i) {
      const double p = relu_grad_ref(r[i], 2 * gn * qn[i]);
      for (int64_t c = 0; c < d; ++c) {
        ref.dW[i * d + c] += p * double(z[n * d + c]);
        ref.dz[n * d + c] += p * double(W[i * d + c]);
      }
      for (int64_t j = 0; j < k; ++j) ref.gram[i * k + j] += gn * r[i] * r[j];
    }
  }
  return ref;
}

// What the quadratic plan's backward kernel is asked for. The launcher asks
// for the Gram wherever any of dV, dB, dA is wanted, so the op's 31 partial
// and full requests reach the kernel as the 7 non-empty subsets of these.
struct QuadraticWants {
  bool dW, gram, dz;
};
constexpr QuadraticWants kWantAll[] = {{true, true, true}};
constexpr QuadraticWants kWantEach[] = {{true, false, false}, {false, true, false},
                                        {false, false, true}, {true, true, false},
                                        {true, false, true},  {false, true, true},
                                        {true, true, true}};
// Those where a kind's blocks start elsewhere than under the full request.
constexpr QuadraticWants kWantMoved[] = {
    {false, true, false}, {false, false, true}, {false, true, true}, {true, true, true}};

// The quadratic plan's kernels, current and previous, on one shape, the
// backward once per request in `wants`. kTensorCores: the bfloat16-staged
// tiles (T = float); their operands are rounded to bfloat16, hence the looser
// bound. kWide: 128 × 128 tiles for the backward's dW and Gram blocks.
// grid_cap: a persistent grid that small.
template <typename T, bool kTensorCores = false, bool kWide = false>
void check_shape(int64_t N, int64_t d, int64_t k, int64_t g_stride, int64_t grid_cap,
                 int64_t partitions, bool specials, std::span<const QuadraticWants> wants,
                 std::mt19937& rng) {
  char shape[160];
  std::snprintf(shape, sizeof shape, "quadratic %s%s%s, N %lld d %lld k %lld, %lld partitions%s%s",
                type_name<T>(), kTensorCores ? " tensor cores" : "", kWide ? " wide" : "",
                (long long)N, (long long)d, (long long)k, (long long)partitions,
                g_stride == 0 ? ", broadcast g" : "", specials ? ", NaN/inf" : "");
  set_context("%s", shape);
  const double tol = kTensorCores ? 3e-2 : sizeof(T) == 8 ? 1e-12 : 1e-5;
  std::vector<T> z = eighths<T>(N * d, rng);
  const std::vector<T> W = eighths<T>(k * d, rng), Qraw = random_values<T>(k * k, rng),
                       g = random_values<T>(g_stride == 0 ? 1 : N, rng);
  if (specials) add_special_values(z, N, d);
  std::vector<T> Q(k * k);
  for (int64_t i = 0; i < k; ++i)  // symmetric, as Mᵀ diag(a) M is
    for (int64_t j = 0; j < k; ++j) Q[i * k + j] = T(0.5) * (Qraw[i * k + j] + Qraw[j * k + i]);
  const QuadraticReference ref = quadratic_reference(z, W, Q, g, g_stride, N, d, k);

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
  expect_close("forward f", f, ref.f, tol);
  expect_close("forward r", r, ref.r, tol);
  expect_close("forward q", qv, ref.q, tol);
  expect_close("forward f (not saving)", f_only[0], ref.f, tol);
  expect_bitwise("forward f", f, before[0]);
  expect_bitwise("forward r", r, before[1]);
  expect_bitwise("forward q", qv, before[2]);
  expect_bitwise("forward f (not saving)", f_only[0], f);

  // The backward reads the r and q this forward saved, as on the device; the
  // reference never does. Every output buffer is there, poisoned, requested
  // or not (the launcher passes null for one not requested, where a stray
  // write would fault on the device): one not requested must come back
  // untouched.
  for (const QuadraticWants& want : wants) {
    set_context("%s; backward for%s%s%s", shape, want.dW ? " dW" : "",
                want.gram ? " Gram" : "", want.dz ? " dz" : "");
    const plan::BackwardBlocks blocks = plan::quadratic_backward_blocks(
        N, d, k, partitions, kWide, want.dW, want.gram, want.dz);
    auto backward = [&](auto kernel, auto args) {
      std::vector<T> dW_parts(partitions * k * d, poison<T>()),
          gram_parts(partitions * k * k, poison<T>()), dz(N * d, poison<T>());
      args.z = z.data(), args.W = W.data(), args.g = g.data(), args.r = r.data(), args.q = qv.data();
      args.g_stride = g_stride;
      args.dW_parts = dW_parts.data(), args.gram_parts = gram_parts.data(), args.dz = dz.data();
      args.N = N, args.d = d, args.k = k;
      args.rows_per_partition = blocks.rows_per_partition;
      args.dW_blocks = blocks.dW, args.gram_blocks = blocks.gram, args.dz_blocks = blocks.dz;
      launch(blocks.total(), q::tiles::kThreads, kernel, args);
      return std::vector<std::vector<T>>{dW_parts, gram_parts, dz};
    };
    const auto grads =
        backward(q::quadratic_backward_kernel<T, kTensorCores, kWide>, q::QuadraticBackwardArgs<T>{});
    if (want.dW) {
      std::vector<T> dW(k * d, poison<T>());
      launch(3, 64, q::sum_partitions_kernel<T>, grads[0].data(), partitions, k, d, false, dW.data());
      expect_close("backward dW", dW, ref.dW, tol);
    } else {
      expect_untouched("backward dW partitions", grads[0]);
    }
    if (want.gram) {
      std::vector<T> G(k * k, poison<T>());
      launch(2, 32, q::sum_partitions_kernel<T>, grads[1].data(), partitions, k, k, true, G.data());
      expect_close("backward Gram", G, ref.gram, tol);
    } else {
      expect_untouched("backward Gram partitions", grads[1]);
    }
    if (want.dz) {
      expect_close("backward dz", grads[2], ref.dz, tol);
    } else {
      expect_untouched("backward dz", grads[2]);
    }
    // The previous kernel places the blocks alike; under the full request
    // every kind of block runs, which is all the bitwise check guards.
    if (want.dW && want.gram && want.dz) {
      const auto grads_before = backward(pq::quadratic_backward_kernel<T, kTensorCores, kWide>,
                                         pq::QuadraticBackwardArgs<T>{});
      expect_bitwise("backward dW partitions", grads[0], grads_before[0]);
      expect_bitwise("backward Gram partitions", grads[1], grads_before[1]);
      expect_bitwise("backward dz", grads[2], grads_before[2]);
    }
  }
}

// The direct plan's inputs: z and W in eighths (see eighths), the rest
// normal; g: one per sample, or (g_stride 0) one broadcast to all.
template <typename T>
struct DirectInputs {
  int64_t N, d, k, m, ell, g_stride;
  std::vector<T> z, W, V, B, A, g;
};

template <typename T>
DirectInputs<T> direct_inputs(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell,
                              int64_t g_stride, std::mt19937& rng) {
  DirectInputs<T> in{N, d, k, m, ell, g_stride};
  in.z = eighths<T>(N * d, rng);
  in.W = eighths<T>(k * d, rng);
  in.V = random_values<T>(m * k, rng);
  in.B = random_values<T>(ell * m, rng);
  in.A = random_values<T>(ell, rng);
  in.g = random_values<T>(g_stride == 0 ? 1 : N, rng);
  return in;
}

// The direct plan's chain, from the inputs alone, in float64, sample by
// sample: x = W z, r = relu(x), u = V r, y = B u, f = Σ a ⊙ y²; and for the
// backward e = 2 g a ⊙ y, gu = Bᵀ e, p = h ⊙ Vᵀ gu, dz = Wᵀ p, and summed
// over the samples dW = Σ p zᵀ, dV = Σ gu rᵀ, dB = Σ e uᵀ, dA = Σ g y².
// The gradients in the op's order: dz, dW, dV, dB, dA.
struct ChainReference {
  std::vector<double> f;
  std::vector<double> grads[5];
};

template <typename T>
ChainReference chain_reference(const DirectInputs<T>& in) {
  const int64_t N = in.N, d = in.d, k = in.k, m = in.m, ell = in.ell;
  ChainReference ref{std::vector<double>(N),
                     {std::vector<double>(N * d, 0), std::vector<double>(k * d, 0),
                      std::vector<double>(m * k, 0), std::vector<double>(ell * m, 0),
                      std::vector<double>(ell, 0)}};
  auto& [dz, dW, dV, dB, dA] = ref.grads;
  for (int64_t n = 0; n < N; ++n) {
    const double gn = double(in.g[in.g_stride * n]);
    std::vector<double> r(k), u(m, 0), y(ell, 0), e(ell), gu(m, 0), p(k, 0);
    for (int64_t i = 0; i < k; ++i) {
      double x = 0;
      for (int64_t c = 0; c < d; ++c) x += double(in.W[i * d + c]) * double(in.z[n * d + c]);
      r[i] = relu_ref(x);
    }
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < k; ++i) u[j] += double(in.V[j * k + i]) * r[i];
    for (int64_t l = 0; l < ell; ++l)
      for (int64_t j = 0; j < m; ++j) y[l] += double(in.B[l * m + j]) * u[j];
    double f = 0;
    for (int64_t l = 0; l < ell; ++l) {
      f += double(in.A[l]) * y[l] * y[l];
      dA[l] += gn * y[l] * y[l];
      e[l] = 2 * gn * double(in.A[l]) * y[l];
      for (int64_t j = 0; j < m; ++j) {
        dB[l * m + j] += e[l] * u[j];
        gu[j] += double(in.B[l * m + j]) * e[l];
      }
    }
    ref.f[n] = f;
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < k; ++i) {
        dV[j * k + i] += gu[j] * r[i];
        p[i] += double(in.V[j * k + i]) * gu[j];
      }
    for (int64_t i = 0; i < k; ++i) {
      p[i] = relu_grad_ref(r[i], p[i]);
      for (int64_t c = 0; c < d; ++c) {
        dW[i * d + c] += p[i] * double(in.z[n * d + c]);
        dz[n * d + c] += double(in.W[i * d + c]) * p[i];
      }
    }
  }
  return ref;
}

// The direct plan's warp forward, against float64 and, bitwise, against the
// kernel as the .cu had it; scratch: the per-warp buffers in global scratch
// (a device whose default shared memory is too small for them).
template <typename T>
void check_direct_forward(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell, bool scratch,
                          int64_t sms, bool specials, std::mt19937& rng) {
  set_context("direct forward %s, N %lld d %lld k %lld m %lld ell %lld%s%s", type_name<T>(),
              (long long)N, (long long)d, (long long)k, (long long)m, (long long)ell,
              scratch ? ", global scratch" : "", specials ? ", NaN/inf" : "");
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  DirectInputs<T> in = direct_inputs<T>(N, d, k, m, ell, 1, rng);
  if (specials) add_special_values(in.z, N, d);
  const std::vector<double> f_ref = chain_reference(in).f;
  const int64_t smem = scratch ? 0 : 48 << 10;
  const plan::DeviceLimits dev{smem, smem, smem, sms, 90};
  const plan::DirectForwardShared shared = plan::direct_forward_shared(dev, {0, 90}, k, m, sizeof(T));
  if (shared.scratch != scratch) return fail("direct forward", "scratch decision", 0);
  const int64_t grid = plan::direct_forward_grid(dev, N, 2);
  auto run = [&](auto kernel) {
    std::vector<T> f(N, poison<T>());
    std::vector<T> buf(scratch ? plan::direct_forward_scratch_elems(grid, k, m) : 0, poison<T>());
    launch(grid, torchext::direct::kForwardThreads, kernel, in.z.data(), in.W.data(), in.V.data(),
           in.B.data(), in.A.data(), f.data(), scratch ? buf.data() : nullptr, N, d, k, m, ell);
    return f;
  };
  const std::vector<T> f = run(torchext::direct::warp_forward_kernel<T>);
  expect_close("direct forward f", f, f_ref, tol);
  expect_bitwise("direct forward f", f, run(previous::torchext::previous_direct::forward_kernel<T>));
}

// A request of gradients: bit i for the op's gradient i (dz, dW, dV, dB, dA).
using Request = unsigned;
enum : Request { kDz = 1, kDW = 2, kDV = 4, kDB = 8, kDA = 16, kAllGrads = 31 };
constexpr const char* kGradNames[5] = {"dz", "dW", "dV", "dB", "dA"};

constexpr std::array<Request, kAllGrads> every_request() {
  std::array<Request, kAllGrads> requests{};
  for (Request i = 0; i < kAllGrads; ++i) requests[i] = i + 1;
  return requests;
}
constexpr std::array<Request, kAllGrads> kEveryRequest = every_request();

// The direct plan's small-batch backward, once per request: the requested
// gradients against the chain's float64 reference; the others get the null
// pointers the launcher passes (a write through one faults: on_fault).
template <typename T>
void check_small_direct(int64_t N, int64_t d, int64_t k, int64_t m, int64_t ell, int64_t g_stride,
                        std::span<const Request> requests, std::mt19937& rng) {
  const double tol = sizeof(T) == 8 ? 1e-12 : 1e-5;
  const DirectInputs<T> in = direct_inputs<T>(N, d, k, m, ell, g_stride, rng);
  const ChainReference ref = chain_reference(in);
  const size_t sizes[5] = {size_t(N * d), size_t(k * d), size_t(m * k), size_t(ell * m), size_t(ell)};
  for (const Request request : requests) {
    std::string wanted;
    for (int i = 0; i < 5; ++i)
      if (request >> i & 1) wanted += std::string(" ") + kGradNames[i];
    set_context("small direct backward %s, N %lld d %lld k %lld m %lld ell %lld%s; for%s",
                type_name<T>(), (long long)N, (long long)d, (long long)k, (long long)m,
                (long long)ell, g_stride == 0 ? ", broadcast g" : "", wanted.c_str());
    std::vector<T> grads[5];
    T* out[5];
    for (int i = 0; i < 5; ++i) {
      if (request >> i & 1) grads[i].assign(sizes[i], poison<T>());
      out[i] = request >> i & 1 ? grads[i].data() : nullptr;
    }
    torchext::direct::SmallBackwardArgs<T> a{};
    a.z = in.z.data(), a.W = in.W.data(), a.V = in.V.data(), a.B = in.B.data(), a.a = in.A.data();
    a.g = in.g.data(), a.g_stride = g_stride;
    a.dz = out[0], a.dW = out[1], a.dV = out[2], a.dB = out[3], a.dA = out[4];
    a.N = N, a.d = d, a.k = k, a.m = m, a.ell = ell;
    launch(1, torchext::direct::kThreads, torchext::direct::small_backward_kernel<T>, a);
    for (int i = 0; i < 5; ++i) {
      if (!(request >> i & 1)) continue;
      const std::string what = std::string("small direct ") + kGradNames[i];
      expect_close(what.c_str(), grads[i], ref.grads[i], tol);
    }
  }
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
  // FAIL lines reach the pipe before a fault ends the run.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::signal(SIGSEGV, on_fault);
  std::signal(SIGBUS, on_fault);
  std::mt19937 rng(2026);
  check_bfloat16_rounding();
  struct Case {
    int64_t N, d, k, g_stride, grid_cap, partitions;
    std::span<const QuadraticWants> wants;
  };
  // Around the 64-wide tiles and 16-deep steps; a persistent grid smaller
  // than the tile count; several partitions, one of them short; widths not
  // a multiple of 4 (the forward's rows then move element by element). The
  // backward under partial requests where there are several partitions and
  // tile edges: a request without dW or the Gram moves the later kinds'
  // blocks.
  const Case cases[] = {
      {1, 1, 1, 1, 4, 1, kWantAll},      {5, 3, 2, 0, 4, 1, kWantAll},
      {64, 16, 64, 1, 1, 1, kWantAll},   {65, 17, 65, 1, 2, 2, kWantEach},
      {130, 33, 70, 0, 2, 3, kWantMoved}, {200, 80, 129, 1, 8, 4, kWantAll},
  };
  for (const Case& c : cases) {
    check_shape<float>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, false, c.wants, rng);
    check_shape<double>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, false, c.wants, rng);
    check_shape<float, true>(c.N, c.d, c.k, c.g_stride, c.grid_cap, c.partitions, false, c.wants, rng);
  }
  // NaN and infinities in the inputs, on every engine.
  check_shape<float>(70, 17, 68, 1, 2, 2, true, kWantAll, rng);
  check_shape<double>(70, 17, 66, 0, 2, 2, true, kWantAll, rng);
  check_shape<float, true>(70, 17, 65, 1, 2, 2, true, kWantAll, rng);
  check_shape<float, true>(3, 5, 7, 0, 1, 1, true, kWantAll, rng);
  // The wide (128 × 128) weight-gradient tiles, around their edges.
  check_shape<float, false, true>(150, 128, 128, 1, 2, 2, false, kWantAll, rng);
  check_shape<float, false, true>(77, 200, 131, 0, 2, 3, false, kWantEach, rng);
  check_shape<float, false, true>(40, 300, 257, 1, 1, 1, false, kWantAll, rng);
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
  // The direct plan's small-batch backward: the seed's sizes, and k wider
  // than the block with a broadcast gradient, under every request; d and m
  // wider than the block under a few.
  const Request some[] = {kAllGrads, kDz, kDW, kDV, kDB | kDA, kDW | kDV};
  check_small_direct<float>(1, 16, 16, 16, 16, 1, kEveryRequest, rng);
  check_small_direct<double>(5, 3, 300, 7, 2, 0, kEveryRequest, rng);
  check_small_direct<double>(3, 260, 5, 270, 9, 1, some, rng);
  check_small_direct<float>(4, 260, 5, 270, 9, 0, some, rng);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
