// The only file that includes torch headers: it checks tensors, turns them into raw
// pointers and registers the ops with torch.library. Kernels live in cpu/ and cuda/ and
// share their per-pixel and per-matrix math through include/.
#include <torch/extension.h>

#ifdef EMPSSL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// ---- Total Coding Rate (tcr) -------------------------------------------------------

// ---- Multi-patch augmentation (augment) ---------------------------------------------

// ---- Registration ---------------------------------------------------------------------

TORCH_LIBRARY(empssl, m) {
  // tcr schema
  // augment schema
}

TORCH_LIBRARY_IMPL(empssl, CPU, m) {
  // tcr cpu
  // augment cpu
}

#ifdef EMPSSL_WITH_CUDA
TORCH_LIBRARY_IMPL(empssl, CUDA, m) {
  // tcr cuda
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
