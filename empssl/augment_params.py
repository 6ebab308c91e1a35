"""Layout of the per-patch augmentation parameter tensor (SPEC.md section 4).

The sampler draws one row per patch into a float32 tensor of shape (P, NUM_PARAMS); every
backend (reference, Triton, CUDA, CPU C++) reads the same columns. Integers (crop box,
op order) and flags (0.0 / 1.0) are stored exactly as float32. The C++ mirror of this
layout is csrc/include/augment_params.h; the backend-vs-reference tests catch any drift.
"""
CROP_TOP = 0  # crop box in source pixels (integers)
CROP_LEFT = 1
CROP_HEIGHT = 2
CROP_WIDTH = 3
FLIP = 4  # 1.0: horizontal flip (after the resized crop)
JITTER = 5  # 1.0: colour jitter applied (p = 0.8)
BRIGHTNESS = 6  # jitter factors: brightness, contrast, saturation multiply; hue is an additive shift
CONTRAST = 7
SATURATION = 8
HUE = 9
ORDER_0 = 10  # ORDER_0..ORDER_3: the op applied at position k (0 brightness, 1 contrast, 2 saturation, 3 hue)
ORDER_1 = 11
ORDER_2 = 12
ORDER_3 = 13
GRAYSCALE = 14  # 1.0: RandomGrayscale fired
BLUR_SIGMA = 15  # 0.0: no blur; otherwise the Gaussian sigma
SOLARIZE = 16  # 1.0: solarize fired
NUM_PARAMS = 17

OP_BRIGHTNESS, OP_CONTRAST, OP_SATURATION, OP_HUE = 0, 1, 2, 3
