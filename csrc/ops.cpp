// The only file that includes torch headers: it checks tensors, turns them into raw
// pointers and registers the ops with torch.library. Kernels live in cpu/ and cuda/ and
// share their per-pixel and per-matrix math through include/.
#include <torch/extension.h>

#ifdef EMPSSL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// ---- Total Coding Rate (tcr) -------------------------------------------------------

#include <cmath>

#include "tcr_math.h"

namespace empssl {
// csrc/cpu/tcr.cpp: rate (n,) float64; grad nullptr for the forward only
void tcr_forward_backward_cpu(const void* z, int dtype, int64_t n, int64_t b, int64_t d, double alpha, double* rate,
                              void* grad, int num_threads);
#ifdef EMPSSL_WITH_CUDA
// csrc/cuda/tcr.cu: b <= min(d, tcr_cuda_max_rows()); rate (n,) float32
int tcr_cuda_max_rows();
cudaError_t tcr_forward_backward_cuda(const void* z, int dtype, int64_t n, int64_t b, int64_t d, float alpha,
                                      float* rate, void* grad, cudaStream_t stream);
#endif
}  // namespace empssl

namespace {

int tcr_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return empssl::tcr::kFloat32;
    case at::kDouble: return empssl::tcr::kFloat64;
    case at::kBFloat16: return empssl::tcr::kBFloat16;
    case at::kHalf: return empssl::tcr::kFloat16;
    default: TORCH_CHECK(false, "tcr_forward_backward: z must be float32, float64, bfloat16 or float16, got ", t);
  }
}

void tcr_check(const at::Tensor& z, double alpha) {
  TORCH_CHECK(z.dim() == 3, "tcr_forward_backward: z must have shape (n, b, d), got ", z.sizes());
  TORCH_CHECK(z.numel() > 0, "tcr_forward_backward: z must not be empty, got ", z.sizes());
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "tcr_forward_backward: alpha must be positive and finite, got ", alpha);
  tcr_dtype_code(z.scalar_type());
}

// Torch composite on the smaller side (any device): Gram by baddbmm, Cholesky, cholesky_solve.
// The CUDA op uses it where its kernel does not apply (b > 128 or b > d).
std::tuple<at::Tensor, at::Tensor> tcr_composite(const at::Tensor& z, double alpha, bool need_grad) {
  const auto compute = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = z.scalar_type() == compute ? z : z.to(compute);
  const int64_t n = z.size(0), b = z.size(1), d = z.size(2);
  const bool transposed = b > d;  // work on the d x d side: M = I + alpha Z^T Z
  const at::Tensor rows = transposed ? x.transpose(1, 2) : x;
  const int64_t side = std::min(b, d);
  const at::Tensor eye = at::eye(side, x.options()).expand({n, side, side});
  const at::Tensor m = at::baddbmm(eye, rows, rows.transpose(1, 2), 1.0, alpha);
  const at::Tensor factor = std::get<0>(at::linalg_cholesky_ex(m));
  const at::Tensor rate = at::log(at::diagonal(factor, 0, -2, -1)).sum(-1);
  if (!need_grad) return {rate, at::empty({0}, z.options())};
  at::Tensor grad = at::cholesky_solve(rows, factor).mul_(alpha);  // M^{-1} X
  if (transposed) grad = grad.transpose(1, 2);
  return {rate, grad.to(z.scalar_type()).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> tcr_forward_backward_cpu_op(const at::Tensor& z, double alpha, bool need_grad) {
  tcr_check(z, alpha);
  TORCH_CHECK(z.device().is_cpu(), "tcr_forward_backward (cpu): z must be a CPU tensor");
  // the kernel reads float32 or float64; bf16/fp16 are widened here and the gradient narrowed back
  const bool native = z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble;
  const at::Tensor x = (native ? z : z.to(at::kFloat)).contiguous();
  const int64_t n = x.size(0), b = x.size(1), d = x.size(2);
  at::Tensor rate = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor grad = need_grad ? at::empty_like(x) : at::empty({0}, z.options());
  empssl::tcr_forward_backward_cpu(x.data_ptr(), tcr_dtype_code(x.scalar_type()), n, b, d, alpha,
                                   rate.data_ptr<double>(), need_grad ? grad.data_ptr() : nullptr,
                                   at::get_num_threads());
  if (z.scalar_type() != at::kDouble) rate = rate.to(at::kFloat);
  if (need_grad && !native) grad = grad.to(z.scalar_type());
  return {rate, grad};
}

#ifdef EMPSSL_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> tcr_forward_backward_cuda_op(const at::Tensor& z, double alpha, bool need_grad) {
  tcr_check(z, alpha);
  TORCH_CHECK(z.device().is_cuda(), "tcr_forward_backward (cuda): z must be a CUDA tensor");
  TORCH_CHECK(z.scalar_type() != at::kDouble, "tcr_forward_backward (cuda): z must be float32, bfloat16 or float16");
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), b = z.size(1), d = z.size(2);
  if (b > d || b > empssl::tcr_cuda_max_rows()) return tcr_composite(z, alpha, need_grad);
  const at::Tensor x = z.contiguous();
  at::Tensor rate = at::empty({n}, x.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty_like(x) : at::empty({0}, z.options());
  const cudaError_t err = empssl::tcr_forward_backward_cuda(
      x.data_ptr(), tcr_dtype_code(x.scalar_type()), n, b, d, static_cast<float>(alpha), rate.data_ptr<float>(),
      need_grad ? grad.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "tcr_forward_backward (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return {rate, grad};
}
#endif

}  // namespace

// ---- Multi-patch augmentation (augment) ---------------------------------------------

// ---- Registration ---------------------------------------------------------------------

TORCH_LIBRARY(empssl, m) {
  // tcr schema
  m.def("tcr_forward_backward(Tensor z, float alpha, bool need_grad) -> (Tensor, Tensor)");
  // augment schema
}

TORCH_LIBRARY_IMPL(empssl, CPU, m) {
  // tcr cpu
  m.impl("tcr_forward_backward", &tcr_forward_backward_cpu_op);
  // augment cpu
}

#ifdef EMPSSL_WITH_CUDA
TORCH_LIBRARY_IMPL(empssl, CUDA, m) {
  // tcr cuda
  m.impl("tcr_forward_backward", &tcr_forward_backward_cuda_op);
  // augment cuda
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef EMPSSL_WITH_CUDA
  module.attr("with_cuda") = true;
#else
  module.attr("with_cuda") = false;
#endif
}
