"""The multi-patch augmentation (docs/method.md section 4): its recipe (``config``), the layout of its per-patch
parameters (``params``, shared with the kernels), crop boxes (``crops``), counter-based random numbers (``rng``) and
the module users call (``multipatch``); the op and its backends are ``empssl.ops.augment``."""

from .config import AugmentConfig
from .multipatch import MultiPatchAugment, sample_augment_params

__all__ = ["AugmentConfig", "MultiPatchAugment", "sample_augment_params"]
