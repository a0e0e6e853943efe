#include "kernel_set.h"

#include "blas.h"
#include "simd_vec.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>
#include <vector>

namespace torchext {
namespace cpu {
namespace {

// The SIMD sets this library was compiled with, widest first.
std::vector<const SimdKernels*> compiled_simd() {
  std::vector<const SimdKernels*> out;
  for (const SimdKernels* k : {avx512_kernels(), avx2_kernels(), neon_kernels()})
    if (k != nullptr) out.push_back(k);
  return out;
}

// What this CPU lacks to run the set, or "" when it runs it.
std::string missing_feature(const std::string& set) {
#if TORCHEXT_AVX2  // (x86 with GCC or clang: the x86 sets)
  __builtin_cpu_init();
  if (set == "avx512") return __builtin_cpu_supports("avx512f") ? "" : "AVX-512F";
  if (set == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? "" : "AVX2 and FMA";
#endif
  (void)set;
  return "";  // neon: ASIMD is part of every aarch64 CPU
}

const SimdKernels* widest_runnable() {
  for (const SimdKernels* k : compiled_simd())
    if (missing_feature(k->name).empty()) return k;
  return nullptr;
}

struct Choice {
  const SimdKernels* simd = nullptr;  // null: generic
  std::string error;
};

Choice resolve() {
  const char* env = std::getenv("TORCHEXT_CPU_KERNELS");
  std::string asked = env == nullptr || *env == '\0' ? "auto" : env;
  for (char& c : asked)  // (printable ASCII in messages: any other byte would not decode in Python)
    if (c < 0x20 || c > 0x7e) c = '?';
  auto refuse = [&](const std::string& why) {
    return Choice{nullptr, "TORCHEXT_CPU_KERNELS=" + asked + ": " + why +
                               "; unset it, or set it to auto or generic"};
  };
  if (asked == "auto") return {widest_runnable(), ""};
  if (asked == "generic") return {nullptr, ""};
  if (asked != "avx512" && asked != "avx2" && asked != "neon")
    return refuse("not a CPU kernel set (auto, avx512, avx2, neon or generic)");
  for (const SimdKernels* k : compiled_simd()) {
    if (asked != k->name) continue;
    const std::string missing = missing_feature(asked);
    if (!missing.empty()) return refuse("this CPU has no " + missing);
    return {k, ""};
  }
  return refuse("this build of torchext has no " + asked + " kernels (compiled: " +
                compiled_kernel_set_names(", ") + ")");
}

const Choice& choice() {
  static const Choice c = resolve();
  return c;
}

}  // namespace

std::string compiled_kernel_set_names(const char* sep) {
  std::string out;
  for (const SimdKernels* k : compiled_simd()) out += std::string(k->name) + sep;
  return out + "generic";
}

const SimdKernels* float32_simd_kernels() {
  const Choice& c = choice();
  TORCH_CHECK(c.error.empty(), "torchext: ", c.error);
  return c.simd;
}

const char* float32_kernel_set_name() {
  const SimdKernels* k = float32_simd_kernels();
  return k == nullptr ? "generic" : k->name;
}

const std::string& kernel_set_error() { return choice().error; }

double fma_rate_gflops(int threads, double seconds) {
  const SimdKernels* k = choice().simd ? choice().simd : widest_runnable();
  if (k == nullptr || threads < 1 || threads > 1024 || !(seconds > 0.0 && seconds <= 60.0)) return 0.0;
  // Calibrate on one thread, then time every thread running that many iterations.
  using clock = std::chrono::steady_clock;
  int64_t iters = int64_t{1} << 16;
  for (;;) {
    const auto t0 = clock::now();
    volatile float sink = k->fma_loop(iters);
    (void)sink;
    const double took = std::chrono::duration<double>(clock::now() - t0).count();
    if (took > seconds / 8 || iters >= (int64_t{1} << 36)) {
      iters = std::max<int64_t>(1, int64_t(double(iters) * std::min(seconds / std::max(took, 1e-9), 64.0)));
      break;
    }
    iters *= 4;
  }
  std::vector<std::thread> pool;
  pool.reserve(size_t(threads));
  const auto t0 = clock::now();
  try {
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([k, iters] {
        volatile float sink = k->fma_loop(iters);
        (void)sink;
      });
  } catch (...) {  // (a thread that cannot start: join those that did, report none)
    for (std::thread& t : pool) t.join();
    return 0.0;
  }
  for (std::thread& t : pool) t.join();
  const double took = std::chrono::duration<double>(clock::now() - t0).count();
  return double(threads) * double(iters) * double(kFmaChains) * double(k->lanes) * 2.0 / took / 1e9;
}

const char* blas_name() {
  if (mkl_set_num_threads_local() != nullptr && fortran_gemm<float>() != nullptr) return "MKL";
  if (fortran_gemm<float>() != nullptr && fortran_gemm<double>() != nullptr) return "BLAS";
  return nullptr;
}

}  // namespace cpu
}  // namespace torchext
