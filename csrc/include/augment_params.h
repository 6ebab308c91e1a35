// C++ mirror of empssl/augment_params.py: the columns of the per-patch parameter rows
// (float32, shape (P, NUM_PARAMS)) and the configuration the kernels need. Any drift from
// the Python layout is caught by tests/test_augment_backends.py (every op tested alone).
#pragma once

#include <cstdint>

namespace empssl {
namespace augment {

constexpr int CROP_TOP = 0;  // crop box in source pixels (integers stored as float)
constexpr int CROP_LEFT = 1;
constexpr int CROP_HEIGHT = 2;
constexpr int CROP_WIDTH = 3;
constexpr int FLIP = 4;
constexpr int JITTER = 5;
constexpr int BRIGHTNESS = 6;
constexpr int CONTRAST = 7;
constexpr int SATURATION = 8;
constexpr int HUE = 9;
constexpr int ORDER_0 = 10;  // ORDER_0..ORDER_3: op id applied at position k
constexpr int GRAYSCALE = 14;
constexpr int BLUR_SIGMA = 15;  // 0: no blur
constexpr int SOLARIZE = 16;
constexpr int NUM_PARAMS = 17;

constexpr int OP_BRIGHTNESS = 0;
constexpr int OP_CONTRAST = 1;
constexpr int OP_SATURATION = 2;
constexpr int OP_HUE = 3;
constexpr int NUM_JITTER_OPS = 4;

// Output element types of the kernels (the torch dtype is chosen in ops.cpp).
enum class OutDtype : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

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
  OutDtype dtype;
  int64_t stride_p, stride_c, stride_y, stride_x;
};

}  // namespace augment
}  // namespace empssl
