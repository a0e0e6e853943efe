// The float32 matrix product of the CPU kernels on AVX-512.
//
// Why our own: the per-chunk products are small (a few hundred rows, widths
// up to a few hundred), where a BLAS call's fixed cost and its choice of
// code path matter: MKL runs float32 products on AMD CPUs far below their
// AVX-512 rate (torch.mm against this kernel at 1024³:
// benchmarks/results/2026-11-29-cpu.md). This kernel
// is one register-blocked loop: 8 rows × 32 columns of C in 16 registers,
// each step one broadcast of A per row and two vector loads of B. Every
// element of C is a fixed sequence of sums over K (blocks of 256, each
// summed in order), so results do not depend on how the work is split.
#pragma once

#include <cstdint>

namespace torchext {
namespace cpu {

// Row-major C (M × N) = op(A) B, plus C's old value when accumulate.
// op(A) = A (M × K, row stride lda) or, when trans_a, Aᵀ (A is K × M, row
// stride lda); B is K × N, row stride ldb. Only after
// avx512_kernels_supported().
void gemm_avx512(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                 const float* B, int64_t ldb, bool accumulate, float* C, int64_t ldc);

// T = Xᵀ: X is rows × cols (row stride ldx), T cols × rows (row stride ldt);
// 16 × 16 tiles transposed in registers (the weights' transposes a call makes).
void transpose_avx512(int64_t rows, int64_t cols, const float* X, int64_t ldx, float* T,
                      int64_t ldt);

}  // namespace cpu
}  // namespace torchext
