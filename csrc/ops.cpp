// The only file that includes torch headers: it checks tensors, turns them into raw
// pointers and registers the ops with torch.library. Kernels live in cpu/ and cuda/, are
// declared in include/launchers.h and share their per-pixel and per-matrix math through include/.
#include <torch/extension.h>

#ifdef EMPSSL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>

#include "launchers.h"

namespace {

using empssl::DType;

// The kernels' code for a torch dtype; `what` names the op and argument in the error.
DType dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, what, " must be float32, float64, bfloat16 or float16, got ", t);
  }
}

// ---- Total Coding Rate (tcr) -------------------------------------------------------

void tcr_check(const at::Tensor& z, double alpha) {
  TORCH_CHECK(z.dim() == 3, "tcr_forward_backward: z must have shape (n, b, d), got ", z.sizes());
  TORCH_CHECK(z.numel() > 0, "tcr_forward_backward: z must not be empty, got ", z.sizes());
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, "tcr_forward_backward: alpha must be positive and finite, got ", alpha);
  dtype_code(z.scalar_type(), "tcr_forward_backward: z");
}

// Torch composite on the smaller side (any device): Gram by baddbmm, Cholesky, cholesky_solve.
// Backend "composite" (empssl/ops/tcr.py): it takes the shapes the CUDA kernel refuses (b > 128 or b > d).
std::tuple<at::Tensor, at::Tensor> tcr_composite_op(const at::Tensor& z, double alpha, bool need_grad) {
  tcr_check(z, alpha);
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
  // the kernel reads float32, float64, bf16 and (where the compiler has _Float16) fp16 itself;
  // otherwise fp16 is widened here and the gradient narrowed back
  const bool native = z.scalar_type() != at::kHalf || empssl::tcr_cpu_reads_float16();
  const at::Tensor x = (native ? z : z.to(at::kFloat)).contiguous();
  const int64_t n = x.size(0), b = x.size(1), d = x.size(2);
  at::Tensor rate = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor grad = need_grad ? at::empty_like(x) : at::empty({0}, z.options());
  empssl::tcr_forward_backward_cpu(x.data_ptr(), dtype_code(x.scalar_type(), "z"), n, b, d, alpha,
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
  TORCH_CHECK(b <= d && b <= empssl::tcr_cuda_max_rows(), "tcr_forward_backward (cuda): the kernel takes b <= d and b <= ",
              empssl::tcr_cuda_max_rows(), ", got b = ", b, ", d = ", d, " (backend 'composite' takes the others)");
  const at::Tensor x = z.contiguous();
  at::Tensor rate = at::empty({n}, x.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty_like(x) : at::empty({0}, z.options());
  const cudaError_t err = empssl::tcr_forward_backward_cuda(
      x.data_ptr(), dtype_code(x.scalar_type(), "z"), n, b, d, static_cast<float>(alpha), rate.data_ptr<float>(),
      need_grad ? grad.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream(z.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, "tcr_forward_backward (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return {rate, grad};
}
#endif

// ---- Multi-patch augmentation (augment) ---------------------------------------------

struct AugmentCall {
  empssl::augment::Images images;
  empssl::augment::Config config;
  empssl::augment::Output output;
  at::Tensor out, source_index, params;
};

// Checks every argument (before any launch) and lays out the raw views the kernels take.
AugmentCall prepare_augment(const at::Tensor& images, const at::Tensor& source_index, const at::Tensor& params,
                            int64_t output_size, int64_t blur_kernel_size, double solarize_threshold,
                            at::ArrayRef<double> mean, at::ArrayRef<double> std, int64_t jitter_op_mask,
                            at::ScalarType out_dtype, bool channels_last) {
  namespace A = empssl::augment;
  TORCH_CHECK(images.dim() == 4 && images.size(3) == 3 && images.scalar_type() == at::kByte,
              "augment_patches: images must be a uint8 view (N, H, W, 3), got ", images.scalar_type(), " ", images.sizes());
  TORCH_CHECK(source_index.dim() == 1 && source_index.scalar_type() == at::kLong,
              "augment_patches: source_index must be int64 of shape (P,), got ", source_index.scalar_type(), " ", source_index.sizes());
  TORCH_CHECK(params.dim() == 2 && params.size(1) == A::NUM_PARAMS && params.scalar_type() == at::kFloat,
              "augment_patches: params must be float32 (P, ", A::NUM_PARAMS, "), got ", params.scalar_type(), " ", params.sizes());
  TORCH_CHECK(params.size(0) == source_index.size(0), "augment_patches: params has ", params.size(0),
              " rows but source_index has ", source_index.size(0));
  TORCH_CHECK(source_index.device() == images.device() && params.device() == images.device(),
              "augment_patches: images, source_index and params must be on one device");
  TORCH_CHECK(images.size(0) > 0 && images.size(1) > 0 && images.size(2) > 0, "augment_patches: images must not be empty");
  TORCH_CHECK(blur_kernel_size >= 1 && blur_kernel_size % 2 == 1, "augment_patches: blur_kernel_size must be odd, got ", blur_kernel_size);
  TORCH_CHECK(output_size >= 1 && output_size > blur_kernel_size / 2, "augment_patches: output_size (", output_size,
              ") must exceed blur_kernel_size / 2 (reflect padding)");
  TORCH_CHECK(mean.size() == 3 && std.size() == 3, "augment_patches: mean and std must have 3 values");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "augment_patches: out_dtype must be float32, bfloat16 or float16, got ", out_dtype);

  AugmentCall call;
  call.source_index = source_index.contiguous();
  call.params = params.contiguous();
  const int64_t P = params.size(0);
  call.out = at::empty({P, 3, output_size, output_size}, images.options().dtype(out_dtype),
                       channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  call.images = {images.data_ptr<uint8_t>(), images.size(0), images.size(1), images.size(2),
                 images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  call.config.output_size = static_cast<int>(output_size);
  call.config.blur_kernel_size = static_cast<int>(blur_kernel_size);
  call.config.solarize_threshold = static_cast<float>(solarize_threshold);
  for (int c = 0; c < 3; ++c) {
    call.config.mean[c] = static_cast<float>(mean[c]);
    call.config.std[c] = static_cast<float>(std[c]);
  }
  call.config.jitter_op_mask = static_cast<int>(jitter_op_mask);
  call.output = {call.out.data_ptr(), dtype_code(out_dtype, "augment_patches: out_dtype"), call.out.stride(0), call.out.stride(1), call.out.stride(2), call.out.stride(3)};
  return call;
}

at::Tensor augment_patches_cpu(const at::Tensor& images, const at::Tensor& source_index, const at::Tensor& params,
                               int64_t output_size, int64_t blur_kernel_size, double solarize_threshold,
                               at::ArrayRef<double> mean, at::ArrayRef<double> std, int64_t jitter_op_mask,
                               at::ScalarType out_dtype, bool channels_last) {
  AugmentCall call = prepare_augment(images, source_index, params, output_size, blur_kernel_size, solarize_threshold,
                                     mean, std, jitter_op_mask, out_dtype, channels_last);
  // on the CPU a real range check is cheap (the CUDA kernel clamps instead: no host sync)
  if (call.source_index.numel() > 0) {
    const auto [lowest, highest] = at::aminmax(call.source_index);
    TORCH_CHECK(lowest.item<int64_t>() >= 0 && highest.item<int64_t>() < images.size(0),
                "augment_patches: source_index must be in [0, ", images.size(0), "), got values in [",
                lowest.item<int64_t>(), ", ", highest.item<int64_t>(), "]");
  }
  if (call.out.numel() > 0) {
    empssl::augment::augment_cpu(call.images, call.source_index.data_ptr<int64_t>(), call.params.data_ptr<float>(),
                                 call.params.size(0), call.config, call.output);
  }
  return call.out;
}

#ifdef EMPSSL_WITH_CUDA
at::Tensor augment_patches_cuda(const at::Tensor& images, const at::Tensor& source_index, const at::Tensor& params,
                                int64_t output_size, int64_t blur_kernel_size, double solarize_threshold,
                                at::ArrayRef<double> mean, at::ArrayRef<double> std, int64_t jitter_op_mask,
                                at::ScalarType out_dtype, bool channels_last) {
  const c10::cuda::CUDAGuard guard(images.device());
  AugmentCall call = prepare_augment(images, source_index, params, output_size, blur_kernel_size, solarize_threshold,
                                     mean, std, jitter_op_mask, out_dtype, channels_last);
  const int64_t P = call.params.size(0);
  if (P == 0) return call.out;
  at::Tensor scratch = at::empty({std::max<int64_t>(1, empssl::augment::augment_cuda_scratch_floats(P, call.config.output_size))},
                                 images.options().dtype(at::kFloat));
  const char* error = empssl::augment::augment_cuda(call.images, call.source_index.data_ptr<int64_t>(),
                                                    call.params.data_ptr<float>(), P, call.config, call.output,
                                                    scratch.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(error == nullptr, "augment_patches (cuda): ", error ? error : "");
  return call.out;
}
#endif

}  // namespace

// ---- Registration ---------------------------------------------------------------------

TORCH_LIBRARY(empssl, m) {
  // tcr schema
  m.def("tcr_forward_backward(Tensor z, float alpha, bool need_grad) -> (Tensor, Tensor)");
  m.def("tcr_forward_backward_composite(Tensor z, float alpha, bool need_grad) -> (Tensor, Tensor)");
  // augment schema
  m.def("augment_patches(Tensor images, Tensor source_index, Tensor params, int output_size, int blur_kernel_size, "
        "float solarize_threshold, float[] mean, float[] std, int jitter_op_mask, ScalarType out_dtype, "
        "bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(empssl, CPU, m) {
  // tcr cpu
  m.impl("tcr_forward_backward", &tcr_forward_backward_cpu_op);
  m.impl("tcr_forward_backward_composite", &tcr_composite_op);
  // augment cpu
  m.impl("augment_patches", &augment_patches_cpu);
}

#ifdef EMPSSL_WITH_CUDA
TORCH_LIBRARY_IMPL(empssl, CUDA, m) {
  // tcr cuda
  m.impl("tcr_forward_backward", &tcr_forward_backward_cuda_op);
  m.impl("tcr_forward_backward_composite", &tcr_composite_op);
  // augment cuda
  m.impl("augment_patches", &augment_patches_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
#ifdef EMPSSL_WITH_CUDA
  module.attr("with_cuda") = true;
  // the largest group size b of the CUDA TCR kernel, for its backend check (empssl/ops/tcr.py)
  module.def("tcr_cuda_max_rows", &empssl::tcr_cuda_max_rows);
#else
  module.attr("with_cuda") = false;
#endif
}
