#include "head_products.h"

#include "../buffers.h"
#include "blas.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>

#include <algorithm>

namespace torchext {
namespace cpu {
namespace {

// A 2-D operand as gemm_rm reads it: row-major, or the transpose of a
// row-major matrix (other layouts are copied).
template <typename T>
struct GemmOperand {
  at::Tensor storage;
  bool trans;
  int64_t ld;
  explicit GemmOperand(const at::Tensor& t) {
    if (t.is_contiguous()) {
      storage = t, trans = false, ld = std::max<int64_t>(1, t.size(1));
    } else if (t.t().is_contiguous()) {
      storage = t, trans = true, ld = std::max<int64_t>(1, t.size(0));
    } else {
      storage = t.contiguous(), trans = false, ld = std::max<int64_t>(1, t.size(1));
    }
  }
  // Row i of the operand (as the product reads it) starts here.
  const T* row(int64_t i) const { return storage.template const_data_ptr<T>() + (trans ? i : i * ld); }
};

// The per-call products of the head (M, Q, and dV, dB, dA from the Gram): a
// b in blocks of kMatmulBlockRows output rows, each one sequential BLAS call,
// the blocks in parallel. The blocks depend on the shapes alone, so the
// result does not depend on the thread count (at::mm's does, for MKL's small
// products) while wide heads still use every core.
constexpr int64_t kMatmulBlockRows = 64;

template <typename T>
void blocked_mm(const GemmOperand<T>& a, const GemmOperand<T>& b, int64_t M, int64_t N,
                int64_t K, T* c) {
  // A task: whole blocks, about 2^18 multiply-adds in all (or one block,
  // where a block has more).
  const int64_t per_block = std::max<int64_t>(1, kMatmulBlockRows * N * K);
  const int64_t task_rows = kMatmulBlockRows * std::max<int64_t>(1, (int64_t{1} << 18) / per_block);
  parallel_ranges(M, task_rows, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end; i0 += kMatmulBlockRows) {
      const int64_t rows = std::min(kMatmulBlockRows, end - i0);
      gemm_rm<T>(a.trans, b.trans, rows, N, K, a.row(i0), a.ld, b.row(0), b.ld, T(0), c + i0 * N, N);
    }
  });
}

}  // namespace

at::Tensor cpu_mm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0));
  at::Tensor out = uninitialized({a.size(0), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "torchext_cpu_mm", [&] {
    blocked_mm<scalar_t>(GemmOperand<scalar_t>(a), GemmOperand<scalar_t>(b), a.size(0), b.size(1),
                         a.size(1), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}


at::Tensor cpu_matmul(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "_cpu_matmul: a and b must be 2-D; got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), "_cpu_matmul: a's columns (", a.size(1),
              ") must match b's rows (", b.size(0), ")");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              "_cpu_matmul: a and b must both be float32 or both float64; got ", a.scalar_type(),
              " and ", b.scalar_type());
  return cpu_mm(a, b);
}

}  // namespace cpu
}  // namespace torchext
