// Total Coding Rate forward + backward on the GPU, one thread block per group (no torch headers).
//
// For a group Z (b x d, b <= d, b <= 128):
//   1. Gram G = Z Z^T from global memory in tiles of kDepth columns staged (transposed, as
//      float32) in shared memory; each of the 256 threads keeps an (BT/16) x (BT/16) register
//      tile of the tile's partial Gram, added to a running total in shared memory. Float32 IEEE
//      FMAs, also for bf16/fp16 input. M = I + alpha G replaces the total in shared memory.
//   2. Symmetric Gauss-Jordan sweep of M in shared memory (tcr_math.h; the CPU kernel applies the
//      same per-entry formulas to the lower triangle): M -> -M^{-1}, pivots kept for logdet.
//   3. logdet = sum log pivots by a block reduction; R = logdet / 2.
//   4. dR/dZ = alpha M^{-1} Z: a second pass over d in tiles (Z read twice in all).
// BT (32, 64, 128) is the smallest tile that holds b. Dispatch (empssl/ops/tcr.py) sends b > 128
// and b > d to backend "composite". Not run on a GPU yet: checked by the CPU tests of the shared math and by
// tests/test_compile_nvcc.py (sm_80/sm_90, no spills); the gpu tests compare it with float64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launchers.h"
#include "tcr_math.h"

namespace empssl {
namespace {

constexpr int kThreads = 256;  // 16 x 16 threads for the register tiles, 8 warps for the sweep
constexpr int kWarps = kThreads / 32;
constexpr int kDepth = 32;     // columns of Z per shared-memory tile
constexpr int kMaxRows = 128;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

__device__ float log_float(float x) { return logf(x); }

// Shared-memory layout of one block, in floats.
template <int BT>
struct Smem {
  // rows of M at a stride that puts rows ty and ty+1 on disjoint banks (16 apart)
  static constexpr int lda = BT + 16;
  // Z tile stored transposed (zs[col][row]); odd stride: the transposed stores do not conflict
  static constexpr int ldz = BT + 1;
  static constexpr int a = 0;
  static constexpr int zs = a + BT * lda;
  static constexpr int col = zs + kDepth * ldz;
  static constexpr int pivots = col + BT;
  static constexpr int partial = pivots + BT;
  static constexpr int floats = partial + kWarps;
  static constexpr size_t bytes = sizeof(float) * floats;
};

// zs[kk][i] = Z[i][c0 + kk] as float32, zero outside (b, d).
template <int BT, class T>
__device__ __forceinline__ void load_tile(const T* __restrict__ z, int b, int d, int c0, float* zs) {
  for (int e = threadIdx.x; e < BT * kDepth; e += kThreads) {
    const int i = e / kDepth, kk = e % kDepth;
    const int c = c0 + kk;
    zs[kk * Smem<BT>::ldz + i] = (i < b && c < d) ? to_float(z[static_cast<int64_t>(i) * d + c]) : 0.f;
  }
}

// Two blocks per SM as the register target: with one, ptxas gave the BT=64 bf16/fp16 kernels
// 40 registers and a 4-byte spill on sm_80; with two, 72-115 registers and no spills (sm_80 and sm_90).
template <int BT, class T>
__global__ void __launch_bounds__(kThreads, 2) tcr_forward_backward_kernel(const T* __restrict__ z_all,
                                                                        T* __restrict__ grad_all,
                                                                        float* __restrict__ rate, int b, int d,
                                                                        float alpha) {
  constexpr int R = BT / 16;  // register tile rows (and Gram columns) per thread
  extern __shared__ float smem[];
  float* a = smem + Smem<BT>::a;
  float* zs = smem + Smem<BT>::zs;
  float* col = smem + Smem<BT>::col;
  float* pivots = smem + Smem<BT>::pivots;
  float* partial = smem + Smem<BT>::partial;
  constexpr int lda = Smem<BT>::lda, ldz = Smem<BT>::ldz;

  const int64_t group = blockIdx.x;
  const T* z = z_all + group * b * d;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // 1. Gram: thread (ty, tx) owns rows ty + 16 r and columns tx + 16 c. Each kDepth-column
  //    tile's partial Gram is an fma chain from 0 in registers, then added to the running total,
  //    which lives in a (free until the sweep; each thread touches only its own entries). One
  //    chain over all of d let the rounding error of R grow with d (4.8e-5 on nearly collapsed
  //    Z at d = 1024, 0.8-1.4e-5 chunked: tests/test_tcr_float32_model.py); a second register
  //    tile for the total would spill at BT = 128.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < R; ++c) a[(ty + 16 * r) * lda + tx + 16 * c] = 0.f;
  for (int c0 = 0; c0 < d; c0 += kDepth) {
    load_tile<BT>(z, b, d, c0, zs);
    __syncthreads();
    float acc[R][R];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < R; ++c) acc[r][c] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < kDepth; ++kk) {
      float zi[R], zj[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        zi[r] = zs[kk * ldz + ty + 16 * r];
        zj[r] = zs[kk * ldz + tx + 16 * r];
      }
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < R; ++c) acc[r][c] = fmaf(zi[r], zj[c], acc[r][c]);
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < R; ++c) a[(ty + 16 * r) * lda + tx + 16 * c] += acc[r][c];
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < R; ++c) {
      const int i = ty + 16 * r, j = tx + 16 * c;
      if (i < b && j < b) a[i * lda + j] = alpha * a[i * lda + j] + (i == j ? 1.f : 0.f);
    }
  __syncthreads();

  // 2. Sweep M -> -M^{-1}: b steps of (copy pivot column | update rows), a barrier after each.
  for (int k = 0; k < b; ++k) {
    tcr::sweep_copy_pivot_column(a, lda, b, k, col, threadIdx.x, kThreads);
    __syncthreads();
    if (threadIdx.x == 0) pivots[k] = col[k];
    for (int i = warp; i < b; i += kWarps) tcr::sweep_update_row(a + i * lda, i, k, col, b, lane, 32);
    __syncthreads();
  }

  // 3. logdet = sum of log pivots (block reduction).
  float log_sum = 0.f;
  for (int i = threadIdx.x; i < b; i += kThreads) log_sum += log_float(pivots[i]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) log_sum += __shfl_down_sync(0xffffffffu, log_sum, offset);
  if (lane == 0) partial[warp] = log_sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w];
    rate[group] = 0.5f * total;
  }
  if (grad_all == nullptr) return;

  // 4. dR/dZ = alpha M^{-1} Z = -alpha (a Z): thread (ty, tx) owns rows ty + 16 r and
  //    tile columns tx and tx + 16 of each kDepth-column tile.
  T* grad = grad_all + group * b * d;
  for (int c0 = 0; c0 < d; c0 += kDepth) {
    load_tile<BT>(z, b, d, c0, zs);
    __syncthreads();
    float out[R][2];
#pragma unroll
    for (int r = 0; r < R; ++r) out[r][0] = out[r][1] = 0.f;
    for (int k = 0; k < b; ++k) {
      const float z0 = zs[tx * ldz + k], z1 = zs[(tx + 16) * ldz + k];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float m = a[(ty + 16 * r) * lda + k];
        out[r][0] = fmaf(m, z0, out[r][0]);
        out[r][1] = fmaf(m, z1, out[r][1]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = ty + 16 * r;
      if (i >= b) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = c0 + tx + 16 * h;
        if (c < d) grad[static_cast<int64_t>(i) * d + c] = from_float<T>(-alpha * out[r][h]);
      }
    }
    __syncthreads();  // zs is reloaded
  }
}

template <int BT, class T>
cudaError_t launch(const void* z, void* grad, float* rate, int64_t n, int b, int d, float alpha,
                   cudaStream_t stream) {
  auto kernel = tcr_forward_backward_kernel<BT, T>;
  const size_t bytes = Smem<BT>::bytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(n), kThreads, bytes, stream>>>(static_cast<const T*>(z), static_cast<T*>(grad), rate, b,
                                                              d, alpha);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_for_rows(const void* z, void* grad, float* rate, int64_t n, int b, int d, float alpha,
                            cudaStream_t stream) {
  if (b <= 32) return launch<32, T>(z, grad, rate, n, b, d, alpha, stream);
  if (b <= 64) return launch<64, T>(z, grad, rate, n, b, d, alpha, stream);
  return launch<128, T>(z, grad, rate, n, b, d, alpha, stream);
}

}  // namespace

int tcr_cuda_max_rows() { return kMaxRows; }

// Declared (with its contract) in launchers.h; z on the stream's device.
cudaError_t tcr_forward_backward_cuda(const void* z, DType dtype, int64_t n, int64_t b, int64_t d, float alpha,
                                      float* rate, void* grad, cudaStream_t stream) {
  if (n <= 0 || b <= 0 || b > kMaxRows || b > d || d > INT32_MAX || n > INT32_MAX) return cudaErrorInvalidValue;
  const int bi = static_cast<int>(b), di = static_cast<int>(d);
  switch (dtype) {
    case DType::Float32:
      return launch_for_rows<float>(z, grad, rate, n, bi, di, alpha, stream);
    case DType::BFloat16:
      return launch_for_rows<__nv_bfloat16>(z, grad, rate, n, bi, di, alpha, stream);
    case DType::Float16:
      return launch_for_rows<__half>(z, grad, rate, n, bi, di, alpha, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace empssl
