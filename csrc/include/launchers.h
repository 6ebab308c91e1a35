// Entry points of the kernels in cpu/ and cuda/, called by ops.cpp (which alone sees torch)
// and included by their definitions, so that a declaration cannot drift from its kernel.
#pragma once

#include <cstdint>

#include "augment_params.h"
#include "dtype.h"

#if defined(EMPSSL_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace empssl {

// ---- Total Coding Rate: z (n, b, d) contiguous; grad (n, b, d) in z's dtype, or nullptr for the forward only

// cpu/tcr.cpp: Float32, Float64, BFloat16, and Float16 where tcr_cpu_reads_float16(); rate (n,) float64
void tcr_forward_backward_cpu(const void* z, DType dtype, int64_t n, int64_t b, int64_t d, double alpha, double* rate,
                              void* grad, int num_threads);
bool tcr_cpu_reads_float16();  // the compiler has _Float16

// ---- Multi-patch augmentation: params (P, NUM_PARAMS) rows, source_index (P,), output through its strides

namespace augment {
// cpu/augment.cpp
void augment_cpu(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                 const Config& config, const Output& output);
}  // namespace augment

#if defined(EMPSSL_WITH_CUDA) || defined(__CUDACC__)
// cuda/tcr.cu: Float32, BFloat16 or Float16 with b <= min(d, tcr_cuda_max_rows()); rate (n,) float32
int tcr_cuda_max_rows();
cudaError_t tcr_forward_backward_cuda(const void* z, DType dtype, int64_t n, int64_t b, int64_t d, float alpha,
                                      float* rate, void* grad, cudaStream_t stream);

namespace augment {
// cuda/augment.cu: returns nullptr or an error message; scratch holds augment_cuda_scratch_floats floats
const char* augment_cuda(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                         const Config& config, const Output& output, float* scratch, cudaStream_t stream);
int64_t augment_cuda_scratch_floats(int64_t num_patches, int output_size);
}  // namespace augment
#endif

}  // namespace empssl
