// Generated from empssl/augment/params.py by setup.py: do not edit (edit the Python table).
// The columns of the per-patch parameter rows (float32, shape (P, NUM_PARAMS)) and the
// colour jitter op ids stored in ORDER_0..ORDER_3.
#pragma once

namespace empssl {
namespace augment {

constexpr int CROP_TOP = 0;
constexpr int CROP_LEFT = 1;
constexpr int CROP_HEIGHT = 2;
constexpr int CROP_WIDTH = 3;
constexpr int FLIP = 4;
constexpr int JITTER = 5;
constexpr int BRIGHTNESS = 6;
constexpr int CONTRAST = 7;
constexpr int SATURATION = 8;
constexpr int HUE = 9;
constexpr int ORDER_0 = 10;
constexpr int ORDER_1 = 11;
constexpr int ORDER_2 = 12;
constexpr int ORDER_3 = 13;
constexpr int GRAYSCALE = 14;
constexpr int BLUR_SIGMA = 15;
constexpr int SOLARIZE = 16;
constexpr int NUM_PARAMS = 17;
constexpr int OP_BRIGHTNESS = 0;
constexpr int OP_CONTRAST = 1;
constexpr int OP_SATURATION = 2;
constexpr int OP_HUE = 3;
constexpr int NUM_JITTER_OPS = 4;

}  // namespace augment
}  // namespace empssl
