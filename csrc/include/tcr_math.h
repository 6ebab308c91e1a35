// Per-matrix math of the Total Coding Rate run by the CUDA kernel (cuda/tcr.cu) and, on the
// CPU, by tests/cpp/tcr_sweep_driver.cpp (tests/test_tcr_math.py), so that the CPU tests
// exercise the arithmetic the GPU runs. The CPU kernel (cpu/tcr.cpp) applies the same
// per-entry formulas to the lower triangle only, in its own vector loops.
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
// parallel over (first, stride); the test driver emulates the block's threads one by one):
//   1. copy the pivot column k into `col` (it is overwritten during phase 2),
//   2. update every row from `col`.
#pragma once

#include "host_device.h"

namespace empssl {
namespace tcr {

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

}  // namespace tcr
}  // namespace empssl
