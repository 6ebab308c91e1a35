"""Layout of the per-patch augmentation parameter tensor (docs/method.md section 4): the one definition.

The sampler draws one row per patch into a float32 tensor of shape (P, NUM_PARAMS); every
backend (reference, Triton, CUDA, CPU C++) reads the same columns. Integers (crop box,
op order) and flags (0.0 / 1.0) are stored exactly as float32.

The C++ kernels read these constants from csrc/include/augment_layout.h, which is generated
from this module (``c_header()``; setup.py writes it before every build, and
tests/test_augment_params.py checks that the committed file is what this module generates).
This module imports nothing, so that setup.py can load it without the package.
"""

import os

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
ORDER_0 = 10  # ORDER_0..ORDER_3: the op applied at position k (an OP_* id)
ORDER_1 = 11
ORDER_2 = 12
ORDER_3 = 13
GRAYSCALE = 14  # 1.0: RandomGrayscale fired
BLUR_SIGMA = 15  # 0.0: no blur; otherwise the Gaussian sigma
SOLARIZE = 16  # 1.0: solarize fired
NUM_PARAMS = 17

# colour jitter op ids, as stored in ORDER_k; bit k of AugmentConfig.jitter_op_mask() enables op k
OP_BRIGHTNESS = 0
OP_CONTRAST = 1
OP_SATURATION = 2
OP_HUE = 3
NUM_JITTER_OPS = 4

HEADER_PATH = os.path.join("csrc", "include", "augment_layout.h")  # relative to the repository root


def constants() -> dict:
    """Every constant of the layout, name -> value, in the order defined above."""
    return {name: value for name, value in globals().items() if name.isupper() and isinstance(value, int)}


def c_header() -> str:
    """The text of csrc/include/augment_layout.h: these constants as C++ constexprs."""
    lines = [
        "// Generated from empssl/augment/params.py by setup.py: do not edit (edit the Python table).",
        "// The columns of the per-patch parameter rows (float32, shape (P, NUM_PARAMS)) and the",
        "// colour jitter op ids stored in ORDER_0..ORDER_3.",
        "#pragma once",
        "",
        "namespace empssl {",
        "namespace augment {",
        "",
    ]
    lines += [f"constexpr int {name} = {value};" for name, value in constants().items()]
    lines += ["", "}  // namespace augment", "}  // namespace empssl", ""]
    return "\n".join(lines)


def write_c_header(root: str) -> bool:
    """Writes the header under the repository root if its text differs; True when it wrote."""
    path = os.path.join(root, HEADER_PATH)
    text = c_header()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return True
