// Per-matrix math of the Total Coding Rate shared by the CPU (cpu/tcr.cpp) and CUDA
// (cuda/tcr.cu) kernels, so that the CPU tests exercise the arithmetic the GPU runs.
//
//   M = I + alpha * G  (G the Gram matrix on the smaller side), R = 1/2 logdet M,
//   dR/dZ = alpha * M^{-1} Z.
//
// M is symmetric positive definite with eigenvalues >= 1, so a symmetric Gauss-Jordan sweep
// (Goodnight's sweep operator) without pivoting is stable. Sweeping pivot k, with p = a_kk:
//
//   a_kk -> -1/p,  a_ik -> a_ik / p,  a_kj -> a_kj / p,  a_ij -> a_ij - a_ik a_kj / p
//
// After every pivot is swept the matrix holds -M^{-1}, and logdet M = sum_k log p_k.
// Each step has two phases separated by a barrier (a thread block runs each phase in
// parallel over (first, stride); the CPU runs them with first = 0, stride = 1):
//   1. copy the pivot column k into `col` (it is overwritten during phase 2),
//   2. update every row from `col`.
#pragma once

#include "host_device.h"

namespace empssl {
namespace tcr {

// Input dtype codes passed from ops.cpp to the launchers (which see no torch headers).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Phase 1 of sweep step k: col[i] = a[i][k] for i in [first, side) by stride.
template <class T>
EMPSSL_HD void sweep_copy_pivot_column(const T* a, int lda, int side, int k, T* col, int first, int stride) {
  for (int i = first; i < side; i += stride) col[i] = a[i * lda + k];
}

// Phase 2 of sweep step k on row i, entries j in [j_first, side) by j_stride. `col` is the
// pivot column copied in phase 1 (col[k] = p). Written branch-free in j so that it vectorises.
template <class T>
EMPSSL_HD void sweep_update_row(T* row, int i, int k, const T* col, int side, int j_first, int j_stride) {
  const T inv_p = T(1) / col[k];
  if (i == k) {
    for (int j = j_first; j < side; j += j_stride) row[j] = (j == k) ? -inv_p : row[j] * inv_p;
  } else {
    const T f = col[i] * inv_p;
    for (int j = j_first; j < side; j += j_stride) row[j] = (j == k) ? f : row[j] - f * col[j];
  }
}

// The whole sweep, serially (CPU). Returns logdet M; leaves -M^{-1} in a. `col` has side entries.
template <class T>
EMPSSL_HD T sweep_inverse_logdet(T* a, int lda, int side, T* col, T (*log_fn)(T)) {
  T logdet = T(0);
  for (int k = 0; k < side; ++k) {
    sweep_copy_pivot_column(a, lda, side, k, col, 0, 1);
    logdet += log_fn(col[k]);
    for (int i = 0; i < side; ++i) sweep_update_row(a + i * lda, i, k, col, side, 0, 1);
  }
  return logdet;
}

}  // namespace tcr
}  // namespace empssl
