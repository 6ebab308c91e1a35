// EMPSSL_HD marks the inline math shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define EMPSSL_HD __host__ __device__ __forceinline__
#else
#define EMPSSL_HD inline
#endif
