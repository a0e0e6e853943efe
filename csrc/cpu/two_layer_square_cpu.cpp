// CPU kernels. The batch is cut into chunks of rows (see BatchPlan) whose
// working set (x, r, u, y and their gradients) stays in cache while BLAS
// products run on it; partitions of consecutive chunks run in parallel, each
// accumulating its own partial weight gradients, summed in a fixed order.
#include "../two_layer_square.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

// Fortran BLAS of the BLAS library that torch links (MKL on x86 wheels,
// OpenBLAS elsewhere). Weak, so a torch without these symbols still loads us
// and gets the portable loops below instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*,
            const float*, const float*, const int*, const float*, const int*,
            const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*,
            const double*, const double*, const int*, const double*,
            const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace torchext {
namespace {

// Working set of one chunk: about this many elements (a per-core L2), and
// never fewer rows than kChunkMinRows.
constexpr int64_t kChunkScratchElems = int64_t{1} << 17;
constexpr int64_t kChunkMinRows = 256;
constexpr int64_t kMaxPartitions = 16;

template <typename T>
using FortranGemm = void (*)(const char*, const char*, const int*, const int*,
                             const int*, const T*, const T*, const int*,
                             const T*, const int*, const T*, T*, const int*);
template <typename T>
FortranGemm<T> fortran_gemm();
template <>
FortranGemm<float> fortran_gemm<float>() { return sgemm_; }
template <>
FortranGemm<double> fortran_gemm<double>() { return dgemm_; }

bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

// Row-major C(MxN) = op(A)(MxK) * op(B)(KxN) + beta * C. BLAS is column-major,
// so it computes C^T = op(B)^T op(A)^T. Degenerate sizes never reach BLAS.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
             const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
             int64_t ldc) {
  if (M == 0 || N == 0) return;
  auto blas = fortran_gemm<T>();
  if (K > 0 && blas != nullptr && fits_int(M) && fits_int(N) && fits_int(K) &&
      fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K);
    const int la = int(ldb), lb = int(lda), lc = int(ldc);
    const T one = T(1);
    blas(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
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

// torch.relu semantics: NaN stays NaN (a plain max(x, 0) would turn it into 0).
template <typename T>
inline T relu(T x) {
  return x > T(0) ? x : (x != x ? x : T(0));
}

// ReLU's derivative as torch's threshold_backward(grad, r, 0): a select, not a
// product (a NaN upstream stays out of inactive units), and a NaN unit (r NaN)
// passes its gradient through, as `r <= 0` is false for it.
template <typename T>
inline T relu_backward(T grad, T r) {
  return r <= T(0) ? T(0) : grad;
}

// Per-thread buffers for one chunk of `rows` samples.
template <typename T>
struct ChunkScratch {
  std::vector<T> r, u, y, e, gu, gx;
  ChunkScratch(const Dims& dims, int64_t rows, bool backward)
      : r(rows * dims.k), u(rows * dims.m), y(rows * dims.ell) {
    if (backward) {
      e.resize(rows * dims.ell);
      gu.resize(rows * dims.m);
      gx.resize(rows * dims.k);
    }
  }
};

// r = relu(z W^T), u = r V^T, y = u B^T for rows [0, n) of the chunk at zc.
template <typename T>
void chunk_forward(const Dims& dims, const T* zc, int64_t n, const T* W,
                   const T* V, const T* B, ChunkScratch<T>& s) {
  const int64_t d = dims.d, k = dims.k, m = dims.m, ell = dims.ell;
  gemm_rm<T>(false, true, n, k, d, zc, d, W, d, T(0), s.r.data(), k);
  for (int64_t i = 0; i < n * k; ++i) s.r[i] = relu(s.r[i]);
  gemm_rm<T>(false, true, n, m, k, s.r.data(), k, V, k, T(0), s.u.data(), m);
  gemm_rm<T>(false, true, n, ell, m, s.u.data(), m, B, m, T(0), s.y.data(), ell);
}

template <typename T>
void forward_impl(const Dims& dims, const ComputeInputs& in, at::Tensor& f) {
  const BatchPlan plan = make_batch_plan(dims, kChunkScratchElems, kChunkMinRows, kMaxPartitions);
  const T* z = in.z.const_data_ptr<T>();
  const T* W = in.W.const_data_ptr<T>();
  const T* V = in.V.const_data_ptr<T>();
  const T* B = in.B.const_data_ptr<T>();
  const T* a = in.a.const_data_ptr<T>();
  T* out = f.mutable_data_ptr<T>();
  // No reduction across samples here, so chunks are the unit of parallelism.
  at::parallel_for(0, plan.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    ChunkScratch<T> s(dims, plan.chunk_rows, /*backward=*/false);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * plan.chunk_rows;
      const int64_t n = std::min(plan.chunk_rows, dims.N - r0);
      chunk_forward(dims, z + r0 * dims.d, n, W, V, B, s);
      for (int64_t i = 0; i < n; ++i) {
        const T* yi = s.y.data() + i * dims.ell;
        T acc = 0;
        for (int64_t q = 0; q < dims.ell; ++q) acc += a[q] * (yi[q] * yi[q]);
        out[r0 + i] = acc;
      }
    }
  });
}

template <typename T>
void backward_impl(const Dims& dims, const ComputeInputs& in,
                   const at::Tensor& grad, const OutputMask& mask,
                   GradBuffers& bufs) {
  const BatchPlan plan = make_batch_plan(dims, kChunkScratchElems, kChunkMinRows, kMaxPartitions);
  const int64_t d = dims.d, k = dims.k, m = dims.m, ell = dims.ell;
  const T* z = in.z.const_data_ptr<T>();
  const T* W = in.W.const_data_ptr<T>();
  const T* V = in.V.const_data_ptr<T>();
  const T* B = in.B.const_data_ptr<T>();
  const T* a = in.a.const_data_ptr<T>();
  const T* g = grad.const_data_ptr<T>();
  T* gz = mask[kZ] ? bufs.acc[kZ].mutable_data_ptr<T>() : nullptr;
  const bool need_gu = mask[kZ] || mask[kW] || mask[kV];
  const bool need_gx = mask[kZ] || mask[kW];
  const bool need_e = need_gu || mask[kB];

  // Partition 0 accumulates straight into the result buffers; the others get
  // zeroed partials, added afterwards in partition order.
  std::vector<std::array<at::Tensor, kNumInputs>> partials(plan.partitions);
  for (int64_t p = 0; p < plan.partitions; ++p) {
    for (int i = kW; i < kNumInputs; ++i) {
      if (!mask[i]) continue;
      partials[p][i] = p == 0 ? bufs.acc[i] : at::zeros_like(bufs.acc[i]);
    }
  }
  auto ptr = [&](int64_t p, int i) -> T* {
    return mask[i] ? partials[p][i].mutable_data_ptr<T>() : nullptr;
  };

  at::parallel_for(0, plan.partitions, 1, [&](int64_t p0, int64_t p1) {
    ChunkScratch<T> s(dims, plan.chunk_rows, /*backward=*/true);
    for (int64_t p = p0; p < p1; ++p) {
      T* gW = ptr(p, kW);
      T* gV = ptr(p, kV);
      T* gB = ptr(p, kB);
      T* gA = ptr(p, kA);
      const int64_t c_end =
          std::min(plan.num_chunks, (p + 1) * plan.chunks_per_partition);
      for (int64_t c = p * plan.chunks_per_partition; c < c_end; ++c) {
        const int64_t r0 = c * plan.chunk_rows;
        const int64_t n = std::min(plan.chunk_rows, dims.N - r0);
        const T* zc = z + r0 * d;
        const T* gc = g + r0;
        chunk_forward(dims, zc, n, W, V, B, s);
        if (gA) {
          for (int64_t i = 0; i < n; ++i) {
            const T* yi = s.y.data() + i * ell;
            for (int64_t q = 0; q < ell; ++q) gA[q] += gc[i] * (yi[q] * yi[q]);
          }
        }
        if (!need_e) continue;
        for (int64_t i = 0; i < n; ++i) {
          const T* yi = s.y.data() + i * ell;
          T* ei = s.e.data() + i * ell;
          for (int64_t q = 0; q < ell; ++q) ei[q] = T(2) * (gc[i] * a[q]) * yi[q];
        }
        if (gB) gemm_rm<T>(true, false, ell, m, n, s.e.data(), ell, s.u.data(), m, T(1), gB, m);
        if (!need_gu) continue;
        gemm_rm<T>(false, false, n, m, ell, s.e.data(), ell, B, m, T(0), s.gu.data(), m);
        if (gV) gemm_rm<T>(true, false, m, k, n, s.gu.data(), m, s.r.data(), k, T(1), gV, k);
        if (!need_gx) continue;
        gemm_rm<T>(false, false, n, k, m, s.gu.data(), m, V, k, T(0), s.gx.data(), k);
        for (int64_t i = 0; i < n * k; ++i) s.gx[i] = relu_backward(s.gx[i], s.r[i]);
        if (gW) gemm_rm<T>(true, false, k, d, n, s.gx.data(), k, zc, d, T(1), gW, d);
        if (gz) gemm_rm<T>(false, false, n, d, k, s.gx.data(), k, W, d, T(0), gz + r0 * d, d);
      }
    }
  });

  for (int64_t p = 1; p < plan.partitions; ++p) {
    for (int i = kW; i < kNumInputs; ++i) {
      if (mask[i]) bufs.acc[i].add_(partials[p][i]);
    }
  }
}

at::Tensor two_layer_square_cpu(const at::Tensor& z, const at::Tensor& W,
                                const at::Tensor& V, const at::Tensor& B,
                                const at::Tensor& A) {
  return run_forward(z, W, V, B, A, [](const Dims& dims, const ComputeInputs& in, at::Tensor& f) {
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_cpu", [&] {
      forward_impl<scalar_t>(dims, in, f);
    });
  });
}

BackwardResult two_layer_square_backward_cpu(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& W,
    const at::Tensor& V, const at::Tensor& B, const at::Tensor& A,
    std::array<bool, 5> output_mask) {
  return run_backward(grad, z, W, V, B, A, output_mask,
                      [](const Dims& dims, const ComputeInputs& in, const at::Tensor& g,
                         const OutputMask& mask, GradBuffers& bufs) {
    AT_DISPATCH_FLOATING_TYPES(in.z.scalar_type(), "two_layer_square_backward_cpu", [&] {
      backward_impl<scalar_t>(dims, in, g, mask, bufs);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(torchext, CPU, m) {
  m.impl("two_layer_square", &two_layer_square_cpu);
  m.impl("two_layer_square_backward", &two_layer_square_backward_cpu);
}

}  // namespace torchext
