// Total Coding Rate forward + backward on the CPU, one group per OpenMP iteration (torch-free).
//
// Per group, with X the smaller side (X = Z, rows = b when b <= d; X = Z^T, rows = d otherwise):
//   M = I + alpha X X^T  (Gram, lower triangle)
//   sweep M -> -M^{-1} on the lower triangle, logdet M = sum of log pivots (the sweep formulas
//   documented in tcr_math.h, which CUDA runs on the full matrix), then alpha M^{-1} mirrored
//   dR/dZ = alpha M^{-1} X (b <= d) or its transpose (b > d), one 32-column panel at a time,
//   written straight to the gradient in z's dtype (float32, float64, bf16, fp16 read and written
//   here: no widening pass in ops.cpp).
// Everything after the input load is float64: a float32 Gram loses 1e-5 relative in R on
// nearly collapsed Z (also when 32 float32 terms per lane are folded into float64: measured
// 9.8e-6 against a 1e-5 tolerance), and a float32 M^{-1} X loses 1e-2 of the (tiny) gradient of
// an exactly collapsed Z to cancellation. Products of float32 inputs are exact in float64.
//
// Both matrix products run through one register-blocked micro-kernel (4 rows x 32 columns of
// float64 in GCC vector types), compiled for AVX-512, AVX2 and baseline x86-64 by target_clones
// and picked at load time, with the tile split into strips where the registers are narrower.
// Per group the working set (X, M, one packed panel of X^T, one panel of the gradient) stays in
// L2; buffers are 64-byte aligned with row strides that are not multiples of 1 KiB.
// Measured (2-core AVX-512 CPU shared with other jobs, n=20 b=100 d=1024, fwd+bwd, 2 threads,
// bench/tcr.py --quick, one run): float32 10.3 ms against 15.8 ms for the float32 torch
// composite and 651 ms for the naive d x d loop; bf16 11.7 ms against 23.1 ms.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <omp.h>

#include "float_bits.h"
#include "launchers.h"

#pragma GCC optimize("fp-contract=fast")  // let a*b+c become one FMA (ISO C++ mode turns it off)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 11)
#define EMPSSL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EMPSSL_CPU_CLONES
#endif

namespace empssl {
namespace {

typedef double vd8 __attribute__((vector_size(64)));
typedef double vd8u __attribute__((vector_size(64), aligned(8)));  // unaligned access
typedef double vd4 __attribute__((vector_size(32)));                // AVX2 registers
typedef double vd2 __attribute__((vector_size(16)));                // SSE2 registers

// Vector type of NV lanes and its unaligned version.
template <class Vec>
struct Unaligned;
template <>
struct Unaligned<vd8> {
  typedef double type __attribute__((vector_size(64), aligned(8)));
};
template <>
struct Unaligned<vd4> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
};
template <>
struct Unaligned<vd2> {
  typedef double type __attribute__((vector_size(16), aligned(8)));
};

constexpr int kTileRows = 4;   // 4 x 32 measured fastest of 8x16, 8x24, 6x24, 6x32, 4x32, 4x48, 3x64
constexpr int kTileCols = 32;  // four vd8: 16 accumulators of the 32 AVX-512 registers

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Row stride in elements: room for whole tiles plus one 64-byte line, so that consecutive rows
// start in different L1 sets (strides of 1 or 4 KiB put all rows of a panel in a few sets: the
// sweep and the Gram ran 2x slower).
inline int64_t padded_ld(int64_t cols) { return round_up(cols, kTileCols) + 8; }

// Start of a buffer rounded up to 64 bytes, so that rows of padded_ld never split cache lines.
template <class F>
F* align64(F* p) {
  return reinterpret_cast<F*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

constexpr int64_t kTransposeBlock = 8;
constexpr int64_t kGramDepth = 128;  // columns of X per pass: the 32-column panel of X^T (32 KiB) stays in L1

// C[0:kTileRows][0:W V] (+)= sum_{k<K} A[i][k] * B[k][0:W V], W the lanes of Vec; A row-major
// (lda), B row-major (ldb). kTileRows x V vector accumulators stay in registers.
template <bool Accumulate, int V, class Vec = vd8>
static inline __attribute__((always_inline)) void micro_kernel(const double* A, int64_t lda, const double* B,
                                                               int64_t ldb, int64_t K, double* C, int64_t ldc) {
  typedef typename Unaligned<Vec>::type VecU;
  constexpr int W = sizeof(Vec) / sizeof(double);
  Vec c[kTileRows][V];
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) c[r][v] = Vec{0};
  for (int64_t k = 0; k < K; ++k) {
    Vec bv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bv[v] = *reinterpret_cast<const VecU*>(B + k * ldb + W * v);
#pragma GCC unroll 8
    for (int r = 0; r < kTileRows; ++r) {
      const double x = A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) c[r][v] += x * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kTileRows; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      VecU* out = reinterpret_cast<VecU*>(C + r * ldc + W * v);
      if (Accumulate) c[r][v] += *out;
      *out = c[r][v];
    }
}

// The widest double vectors of this CPU, so that the register tiles below use registers rather
// than the stack: GCC lowers a 64-byte vector on AVX2 through memory (the kernel ran 40x slower
// than on AVX-512, slower than the torch composite). The target_clones build of each function
// holds all three tile shapes; the one that fits the CPU it was picked for runs.
enum class VectorWidth { k64, k32, k16 };

VectorWidth cpu_vector_width() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const VectorWidth width = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return VectorWidth::k64;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return VectorWidth::k32;
    return VectorWidth::k16;
  }();
  return width;
#else
  return VectorWidth::k16;
#endif
}

// A kTileRows x 8V tile of micro_kernel: AVX-512 at once (4V of its 32 registers); AVX2 in strips
// of 8 columns (8 of 16 registers); SSE2 in strips of 4 columns (8 of 16 registers).
template <bool Accumulate, int V>
static inline __attribute__((always_inline)) void tile(VectorWidth width, const double* A, int64_t lda,
                                                       const double* B, int64_t ldb, int64_t K, double* C,
                                                       int64_t ldc) {
  if (width == VectorWidth::k64) {
    micro_kernel<Accumulate, V, vd8>(A, lda, B, ldb, K, C, ldc);
  } else if (width == VectorWidth::k32) {
    for (int v = 0; v < V; ++v) micro_kernel<Accumulate, 2, vd4>(A, lda, B + 8 * v, ldb, K, C + 8 * v, ldc);
  } else {
    for (int q = 0; q < 2 * V; ++q) micro_kernel<Accumulate, 2, vd2>(A, lda, B + 4 * q, ldb, K, C + 4 * q, ldc);
  }
}

double log_double(double x) { return std::log(x); }

// row[0:len] -= f * col[0:len], len a multiple of 8 (one step of the sweep on one row).
static inline __attribute__((always_inline)) void subtract_scaled(double* __restrict row,
                                                                  const double* __restrict col, double f,
                                                                  int64_t len) {
  for (int64_t j = 0; j < len; j += 8) {
    vd8u* r = reinterpret_cast<vd8u*>(row + j);
    *r -= f * *reinterpret_cast<const vd8u*>(col + j);
  }
}

// Float64 buffers of one group, padded with zeros so that the micro-kernel needs no edge cases.
// Kept small enough for L2: X, M, one packed Gram panel and one panel of Y.
struct GroupBuffers {
  int64_t rows, len;              // X is rows x len
  int64_t rows_pad, ldx, ldm;
  VectorWidth width = cpu_vector_width();
  std::vector<double> storage;
  double *x, *m, *col, *pack, *ypanel;  // x: rows_pad x ldx, m: rows_pad x ldm, pack: kGramDepth x kTileCols,
                                        // ypanel: rows_pad x kTileCols

  void resize(int64_t rows_, int64_t len_) {
    rows = rows_;
    len = len_;
    rows_pad = round_up(rows, kTileRows);
    ldx = padded_ld(len);
    ldm = padded_ld(rows);
    const int64_t nx = rows_pad * ldx, nm = rows_pad * ldm, npack = kGramDepth * kTileCols, ny = rows_pad * kTileCols;
    const int64_t total = nx + nm + ldm + npack + ny + 8;
    if (static_cast<int64_t>(storage.size()) < total) storage.resize(total);
    x = align64(storage.data());
    m = x + nx;
    col = m + nm;
    pack = col + ldm;
    ypanel = pack + npack;
    // zero the padding the kernels read (the rest is overwritten before it is read)
    for (int64_t r = 0; r < rows_pad; ++r) std::fill(x + r * ldx + (r < rows ? len : 0), x + (r + 1) * ldx, 0.0);
    std::fill(m, m + nm, 0.0);
    std::fill(col, col + ldm, 0.0);
  }
};

// 8 x 8 transpose in registers: out[c][t] = in[t][c] (three rounds of two-source shuffles).
static inline __attribute__((always_inline)) void transpose8x8(const vd8 (&in)[8], vd8 (&out)[8]) {
  vd8 t[8], u[8];
  for (int p = 0; p < 4; ++p) {  // rows 2p, 2p+1 interleaved: even and odd columns
    t[2 * p] = __builtin_shufflevector(in[2 * p], in[2 * p + 1], 0, 8, 2, 10, 4, 12, 6, 14);
    t[2 * p + 1] = __builtin_shufflevector(in[2 * p], in[2 * p + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int h = 0; h < 2; ++h)  // rows 4h..4h+3: columns {0,4}, {1,5}, {2,6}, {3,7}
    for (int e = 0; e < 2; ++e) {
      u[4 * h + e] = __builtin_shufflevector(t[4 * h + e], t[4 * h + 2 + e], 0, 1, 8, 9, 4, 5, 12, 13);
      u[4 * h + 2 + e] = __builtin_shufflevector(t[4 * h + e], t[4 * h + 2 + e], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int c = 0; c < 4; ++c) {  // u[c] holds columns c and c+4 of rows 0-3, u[4+c] of rows 4-7
    out[c] = __builtin_shufflevector(u[c], u[4 + c], 0, 1, 2, 3, 8, 9, 10, 11);
    out[c + 4] = __builtin_shufflevector(u[c], u[4 + c], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// pack[k][j] = x[j0 + j][k0 + k] for k < depth (rounded up to 8: X's padding is zero), j <
// kTileCols; rows of X past `rows` give zeros. In 8 x 8 blocks transposed in registers.
static inline __attribute__((always_inline)) void pack_gram_panel(const double* x, int64_t ldx, int64_t rows,
                                                                  int64_t j0, int64_t k0, int64_t depth, double* pack) {
  for (int64_t j8 = 0; j8 < kTileCols; j8 += 8)
    for (int64_t k8 = 0; k8 < depth; k8 += 8) {
      vd8 in[8], out[8];
      for (int t = 0; t < 8; ++t)
        in[t] = (j0 + j8 + t < rows) ? *reinterpret_cast<const vd8*>(x + (j0 + j8 + t) * ldx + k0 + k8) : vd8{0};
      transpose8x8(in, out);
      for (int c = 0; c < 8; ++c) *reinterpret_cast<vd8*>(pack + (k8 + c) * kTileCols + j8) = out[c];
    }
}

// One Gram tile of 8V columns.
template <int V>
static inline __attribute__((always_inline)) void gram_tile(VectorWidth width, const double* a, int64_t lda,
                                                            const double* pack, int64_t depth, double* c, int64_t ldc,
                                                            bool accumulate) {
  if (accumulate)
    tile<true, V>(width, a, lda, pack, kTileCols, depth, c, ldc);
  else
    tile<false, V>(width, a, lda, pack, kTileCols, depth, c, ldc);
}

// Lower-triangle tiles of X X^T into w.m: for each kTileCols-column panel the rows i >= j0, the
// tiles that cross the diagonal only as wide as their last row needs (whole vectors). In passes
// of kGramDepth columns of X; the panel of X^T is packed contiguously: strided rows of X^T would
// share a few L1 sets. Compiled per ISA.
EMPSSL_CPU_CLONES
void gram_lower(GroupBuffers& w) {
  for (int64_t k0 = 0; k0 < w.len; k0 += kGramDepth) {
    const int64_t depth = std::min(kGramDepth, w.len - k0);
    for (int64_t j0 = 0; j0 < w.rows; j0 += kTileCols) {
      pack_gram_panel(w.x, w.ldx, w.rows, j0, k0, depth, w.pack);
      for (int64_t i0 = j0 / kTileRows * kTileRows; i0 < w.rows; i0 += kTileRows) {
        const double* a = w.x + i0 * w.ldx + k0;
        double* c = w.m + i0 * w.ldm + j0;
        const int64_t width = std::min<int64_t>(kTileCols, i0 + kTileRows - j0);  // entries j <= i
        static_assert(kTileCols == 32, "one case per vector count");
        switch ((width + 7) / 8) {
          case 1: gram_tile<1>(w.width, a, w.ldx, w.pack, depth, c, w.ldm, k0 > 0); break;
          case 2: gram_tile<2>(w.width, a, w.ldx, w.pack, depth, c, w.ldm, k0 > 0); break;
          case 3: gram_tile<3>(w.width, a, w.ldx, w.pack, depth, c, w.ldm, k0 > 0); break;
          default: gram_tile<4>(w.width, a, w.ldx, w.pack, depth, c, w.ldm, k0 > 0); break;
        }
      }
    }
  }
}

// Gram and sweep: returns logdet M and leaves alpha M^{-1} in w.m (rows x rows). Compiled per ISA.
EMPSSL_CPU_CLONES
double group_logdet_and_inverse(GroupBuffers& w, double alpha) {
  const int64_t rows = w.rows;
  gram_lower(w);
  // M = I + alpha G on the lower triangle. From here on only rows < rows and columns < side8 take
  // part; entries past the diagonal are zeroed so that the vector loops stay finite.
  const int64_t side8 = round_up(rows, 8);
  for (int64_t i = 0; i < rows; ++i) {
    double* mi = w.m + i * w.ldm;
    for (int64_t j = 0; j < i; ++j) mi[j] *= alpha;
    mi[i] = 1.0 + alpha * mi[i];
    std::fill(mi + i + 1, mi + side8, 0.0);
  }
  // The sweep of tcr_math.h (the per-entry formulas of tcr::sweep_update_row) written for the lower
  // triangle only (M stays symmetric, half the traffic: the matrix stays in L1). Row i is updated
  // as one vector pass over [0, i] rounded up to 8 and the pivot entry patched afterwards; the
  // few entries past the diagonal it touches are discarded by the mirror at the end.
  double logdet = 0.0;
  for (int64_t k = 0; k < rows; ++k) {
    // pivot column of the symmetric matrix: row k left of the diagonal, column k from it down
    for (int64_t j = 0; j < k; ++j) w.col[j] = w.m[k * w.ldm + j];
    for (int64_t j = k; j < rows; ++j) w.col[j] = w.m[j * w.ldm + k];
    const double inv_p = 1.0 / w.col[k];
    logdet += log_double(w.col[k]);
    for (int64_t i = 0; i < k; ++i) subtract_scaled(w.m + i * w.ldm, w.col, w.col[i] * inv_p, round_up(i + 1, 8));
    double* row_k = w.m + k * w.ldm;
    for (int64_t j = 0; j < k; ++j) row_k[j] = w.col[j] * inv_p;
    row_k[k] = -inv_p;
    for (int64_t i = k + 1; i < rows; ++i) {
      double* row = w.m + i * w.ldm;
      const double f = w.col[i] * inv_p;
      subtract_scaled(row, w.col, f, round_up(i + 1, 8));
      row[k] = f;
    }
  }
  // m holds -M^{-1} (lower): scale it to alpha M^{-1} and mirror it, so that Y below is the
  // gradient itself.
  for (int64_t i = 0; i < rows; ++i) {
    double* mi = w.m + i * w.ldm;
    for (int64_t j = 0; j <= i; ++j) {
      mi[j] *= -alpha;
      w.m[j * w.ldm + i] = mi[j];
    }
  }
  return logdet;
}

// w.ypanel[0:rows_pad][0:kTileCols] = (alpha M^{-1}) X[:, j0 : j0 + kTileCols]. Compiled per ISA.
EMPSSL_CPU_CLONES
void gradient_panel(GroupBuffers& w, int64_t j0) {
  for (int64_t i0 = 0; i0 < w.rows; i0 += kTileRows)
    tile<false, kTileCols / 8>(w.width, w.m + i0 * w.ldm, w.ldm, w.x + j0, w.ldx, w.rows,
                               w.ypanel + i0 * kTileCols, kTileCols);
}

// Element types the kernel reads and writes directly (bf16 and fp16 without a widening pass).
struct BFloat16Bits {
  uint16_t bits;
};

inline double widen(float v) { return v; }
inline double widen(double v) { return v; }
inline double widen(BFloat16Bits v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

template <class T>
inline T narrow(double v) {
  return static_cast<T>(v);
}
// double -> float -> bf16, both round-to-nearest-even: what the float32 kernel followed by
// torch's .to(bfloat16) gave.
template <>
inline BFloat16Bits narrow<BFloat16Bits>(double v) {
  return BFloat16Bits{float_to_bf16_bits(static_cast<float>(v))};
}

#ifdef __FLT16_MAX__
#define EMPSSL_CPU_HAS_FLOAT16 1
inline double widen(_Float16 v) { return static_cast<float>(v); }
template <>
inline _Float16 narrow<_Float16>(double v) {
  return static_cast<_Float16>(static_cast<float>(v));  // double -> float -> half, as before
}
#endif

// Row-major copies between the input or gradient (T) and the float64 buffers, compiled per ISA
// (one overload per element type; target_clones does not take templates).
template <class T>
static inline __attribute__((always_inline)) void widen_rows_impl(const T* __restrict z, int64_t rows, int64_t cols,
                                                                  double* __restrict x, int64_t ldx) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) x[i * ldx + c] = widen(z[i * cols + c]);
}
template <class T>
static inline __attribute__((always_inline)) void narrow_rows_impl(const double* __restrict y, int64_t ldy,
                                                                   int64_t rows, int64_t cols, T* __restrict g,
                                                                   int64_t ldg) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) g[i * ldg + c] = narrow<T>(y[i * ldy + c]);
}
#define EMPSSL_TCR_ROW_COPIES(T)                                                                           \
  EMPSSL_CPU_CLONES void widen_rows(const T* z, int64_t rows, int64_t cols, double* x, int64_t ldx) {       \
    widen_rows_impl(z, rows, cols, x, ldx);                                                                 \
  }                                                                                                         \
  EMPSSL_CPU_CLONES void narrow_rows(const double* y, int64_t ldy, int64_t rows, int64_t cols, T* g,        \
                                     int64_t ldg) {                                                         \
    narrow_rows_impl(y, ldy, rows, cols, g, ldg);                                                           \
  }
EMPSSL_TCR_ROW_COPIES(float)
EMPSSL_TCR_ROW_COPIES(double)
EMPSSL_TCR_ROW_COPIES(BFloat16Bits)
#ifdef EMPSSL_CPU_HAS_FLOAT16
EMPSSL_TCR_ROW_COPIES(_Float16)
#endif
#undef EMPSSL_TCR_ROW_COPIES

template <class T>
void tcr_forward_backward_cpu_impl(const T* z, int64_t n, int64_t b, int64_t d, double alpha, double* rate, T* grad,
                                   int num_threads) {
  const bool transposed = b > d;  // work on the d x d side
  const int64_t rows = transposed ? d : b, len = transposed ? b : d;
  // Small problems on one thread: waking a second one costs more than it saves (measured 0.2 ms
  // on one thread against 8 ms on two for n=20, b=129, d=16 on a busy 2-core machine).
  const double fmas = static_cast<double>(n) * rows * rows * (rows + 2.0 * len);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({num_threads, n, static_cast<int64_t>(fmas / 4e6)})));
#pragma omp parallel num_threads(threads)
  {
    static thread_local GroupBuffers w;  // persists across calls: no page faults per call
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < n; ++g) {
      const T* __restrict zg = z + g * b * d;
      w.resize(rows, len);
      double* __restrict x = w.x;
      if (!transposed) {
        widen_rows(zg, b, d, x, w.ldx);
      } else {
        for (int64_t i0 = 0; i0 < b; i0 += kTransposeBlock)
          for (int64_t c = 0; c < d; ++c)
            for (int64_t i = i0; i < std::min(i0 + kTransposeBlock, b); ++i) x[c * w.ldx + i] = widen(zg[i * d + c]);
      }
      rate[g] = 0.5 * group_logdet_and_inverse(w, alpha);
      if (grad == nullptr) continue;
      T* __restrict gg = grad + g * b * d;
      const double* __restrict y = w.ypanel;
      for (int64_t j0 = 0; j0 < len; j0 += kTileCols) {
        gradient_panel(w, j0);
        const int64_t width = std::min<int64_t>(kTileCols, len - j0);
        if (!transposed) {  // panel rows are rows of the gradient
          narrow_rows(y, kTileCols, b, width, gg + j0, d);
        } else {  // panel columns are rows of the gradient
          for (int64_t c = 0; c < width; ++c)
            for (int64_t i = 0; i < d; ++i) gg[(j0 + c) * d + i] = narrow<T>(y[i * kTileCols + c]);
        }
      }
    }
  }
}

}  // namespace

// Declared (with its contract) in launchers.h.
void tcr_forward_backward_cpu(const void* z, DType dtype, int64_t n, int64_t b, int64_t d, double alpha, double* rate,
                              void* grad, int num_threads) {
  switch (dtype) {
    case DType::Float64:
      return tcr_forward_backward_cpu_impl(static_cast<const double*>(z), n, b, d, alpha, rate,
                                           static_cast<double*>(grad), num_threads);
    case DType::BFloat16:
      return tcr_forward_backward_cpu_impl(static_cast<const BFloat16Bits*>(z), n, b, d, alpha, rate,
                                           static_cast<BFloat16Bits*>(grad), num_threads);
#ifdef EMPSSL_CPU_HAS_FLOAT16
    case DType::Float16:
      return tcr_forward_backward_cpu_impl(static_cast<const _Float16*>(z), n, b, d, alpha, rate,
                                           static_cast<_Float16*>(grad), num_threads);
#endif
    default:
      return tcr_forward_backward_cpu_impl(static_cast<const float*>(z), n, b, d, alpha, rate,
                                           static_cast<float*>(grad), num_threads);
  }
}

bool tcr_cpu_reads_float16() {
#ifdef EMPSSL_CPU_HAS_FLOAT16
  return true;
#else
  return false;
#endif
}

}  // namespace empssl
