// The BLAS binding of the CPU kernels: the BLAS library torch links, through
// its Fortran symbols; gemm_rm, the row-major product every per-chunk step
// runs on (the SIMD kernels' product where they run); the guard that keeps BLAS
// sequential inside the kernels' own parallelism; and parallel_tasks, that
// parallelism.
#pragma once

#include "elementwise.h"
#include "kernel_set.h"
#include "portability.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

// Fortran BLAS of the BLAS library that torch links (MKL on x86 wheels,
// OpenBLAS elsewhere). Weak, so a torch without these symbols still loads us
// and gets the portable loops below instead (portability.h: where weak
// symbols do not exist, those loops always run).
#if TORCHEXT_WEAK_BLAS
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*,
            const float*, const float*, const int*, const float*, const int*,
            const float*, float*, const int*) TORCHEXT_WEAK;
void dgemm_(const char*, const char*, const int*, const int*, const int*,
            const double*, const double*, const int*, const double*,
            const int*, const double*, double*, const int*) TORCHEXT_WEAK;
// MKL's per-thread thread count (absent with other BLAS libraries).
int MKL_Set_Num_Threads_Local(int) TORCHEXT_WEAK;  // C interface (by value)
}
#endif

namespace torchext {
namespace cpu {

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*,
                             const int*, const T*, const T*, const int*,
                             const T*, const int*, const T*, T*, const int*);
template <typename T>
FortranGemm<T> fortran_gemm();
template <>
inline FortranGemm<float> fortran_gemm<float>() {
#if TORCHEXT_WEAK_BLAS
  return sgemm_;
#else
  return nullptr;
#endif
}
template <>
inline FortranGemm<double> fortran_gemm<double>() {
#if TORCHEXT_WEAK_BLAS
  return dgemm_;
#else
  return nullptr;
#endif
}

// MKL's per-thread thread count setter, or null (other BLAS libraries).
inline int (*mkl_set_num_threads_local())(int) {
#if TORCHEXT_WEAK_BLAS
  return &MKL_Set_Num_Threads_Local;
#else
  return nullptr;
#endif
}

inline bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

// What gemm_rm stores: the whole product; relu of it (torch.relu: NaN stays
// NaN); or, for a square C, only the elements on or above the diagonal
// (those below may be left as they were, or written).
enum class GemmOutput { kFull, kRelu, kUpper };

// Row-major C(MxN) = op(A)(MxK) * op(B)(KxN) + beta * C, beta 0 or 1:
// float32 on the SIMD kernels' product where they run (simd_kernels.h says
// why), else BLAS. BLAS is column-major, so it computes
// C^T = op(B)^T op(A)^T. Degenerate sizes never reach BLAS.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
             const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
             int64_t ldc, GemmOutput out = GemmOutput::kFull) {
  if (M == 0 || N == 0) return;
  TORCH_INTERNAL_ASSERT(out != GemmOutput::kUpper || M == N, "gemm_rm: kUpper needs a square C");
  if constexpr (std::is_same_v<T, float>) {
    if (const SimdKernels* simd = float32_simd_kernels()) {
      simd->gemm({trans_a, beta != 0.f, out == GemmOutput::kRelu, out == GemmOutput::kUpper, trans_b},
                 M, N, K, A, lda, B, ldb, C, ldc);
      return;
    }
  }
  if (out == GemmOutput::kUpper) {
    // Blocks of kUpperBlock rows from their diagonal on: about half the work.
    constexpr int64_t kUpperBlock = 32;
    for (int64_t b0 = 0; b0 < M; b0 += kUpperBlock) {
      const int64_t rows = std::min(kUpperBlock, M - b0);
      const T* Ab = trans_a ? A + b0 : A + b0 * lda;
      gemm_rm<T>(trans_a, trans_b, rows, N - b0, K, Ab, lda, trans_b ? B + b0 * ldb : B + b0, ldb,
                 beta, C + b0 * ldc + b0, ldc);
    }
    return;
  }
  auto blas = fortran_gemm<T>();
  if (K > 0 && blas != nullptr && fits_int(M) && fits_int(N) && fits_int(K) &&
      fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K);
    const int la = int(ldb), lb = int(lda), lc = int(ldc);
    const T one = T(1);
    blas(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
  } else {
    for (int64_t i = 0; i < M; ++i) {
      T* c = C + i * ldc;
      for (int64_t j = 0; j < N; ++j) c[j] = beta == T(0) ? T(0) : beta * c[j];
      for (int64_t p = 0; p < K; ++p) {
        const T av = trans_a ? A[p * lda + i] : A[i * lda + p];
        if (trans_b) {
          for (int64_t j = 0; j < N; ++j) c[j] += av * B[j * ldb + p];
        } else {
          const T* b = B + p * ldb;
          for (int64_t j = 0; j < N; ++j) c[j] += av * b[j];
        }
      }
    }
  }
  if (out == GemmOutput::kRelu)
    for (int64_t i = 0; i < M; ++i) relu_inplace(C + i * ldc, N);
}

// MKL on one thread while the guard lives (see parallel_tasks).
class SequentialBlas {
 public:
  SequentialBlas() : set_(mkl_set_num_threads_local()) {
    if (set_ != nullptr) previous_ = set_(1);
  }
  ~SequentialBlas() {
    if (set_ != nullptr) set_(previous_);
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int (*set_)(int);
  int previous_ = 0;
};

// The one way the CPU kernels run in parallel: `tasks` independent tasks
// (chunks, partitions, blocks of a product) on torch's intra-op threads.
// body(claim) runs once for each range of [0, threads) that at::parallel_for
// hands out (once per thread under OpenMP; the whole range where it runs
// inline); claim() returns that range's own tasks first, then whichever of
// the rest no one has taken, then -1. So on a shared or virtual machine, where
// one core often runs slower for a while, the others take its share instead
// of waiting for it at the join, as they would with the tasks dealt out in
// equal shares up front. A task writes only its own outputs, so which thread
// runs it never changes a result.
//
// BLAS is sequential inside: our parallelism is the tasks; inside an OpenMP
// region MKL is sequential anyway, and this also covers the body run on the
// calling thread alone, where MKL would otherwise fork threads for every
// small product (and change how a product is split with the machine's thread
// count). The guard is inside the body, never around the parallel_for: a
// thread's first parallel_for sets its OpenMP thread count from MKL's
// (at::init_num_threads), so a guard around it would leave the thread, and
// every torch op it runs later, on one thread (tests/test_determinism.py
// checks).
template <typename Body>
void parallel_tasks(int64_t tasks, const Body& body) {
  if (tasks <= 0) return;
  const int64_t threads = std::min<int64_t>(tasks, at::get_num_threads());
  std::atomic<int64_t> next{threads};  // tasks [0, threads) are the threads' own
  at::parallel_for(0, threads, 1, [&](int64_t own, int64_t own_end) {
    // [own, own_end): this call's own tasks (all of them where it runs alone)
    const SequentialBlas sequential_blas;
    const auto claim = [&]() -> int64_t {
      if (own < own_end) return own++;
      const int64_t task = next.fetch_add(1, std::memory_order_relaxed);
      return task < tasks ? task : -1;
    };
    body(claim);
  });
}

// parallel_tasks over [0, n) in tasks of `grain` elements: f(begin, end) for
// each.
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
  parallel_tasks((n + grain - 1) / grain, [&](const auto& claim) {
    for (int64_t task; (task = claim()) >= 0;) f(task * grain, std::min(n, (task + 1) * grain));
  });
}

}  // namespace cpu
}  // namespace torchext
