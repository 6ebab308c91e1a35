// What the C++ kernels take besides the parameter rows, whose columns are augment_layout.h
// (generated from empssl/augment/params.py).
#pragma once

#include <cstdint>

#include "augment_layout.h"
#include "dtype.h"

namespace empssl {
namespace augment {

// What the kernels need from AugmentConfig (sampling ranges are the sampler's business).
struct Config {
  int output_size;         // S: patches are 3 x S x S
  int blur_kernel_size;    // odd
  float solarize_threshold;
  float mean[3];
  float std[3];
  // bit k set: jitter op k is applied where the order names it. An op whose strength is 0 in
  // AugmentConfig is skipped entirely, as torchvision's ColorJitter drops it (hue at shift 0
  // is not a bit-exact identity).
  int jitter_op_mask;
};

// uint8 source images viewed as (N, H, W, 3) with element strides (any layout).
struct Images {
  const uint8_t* data;
  int64_t num_images, height, width;
  int64_t stride_n, stride_h, stride_w, stride_c;
};

// Output (P, 3, S, S) with element strides (contiguous or channels_last).
struct Output {
  void* data;
  DType dtype;  // Float32, BFloat16 or Float16
  int64_t stride_p, stride_c, stride_y, stride_x;
};

}  // namespace augment
}  // namespace empssl
