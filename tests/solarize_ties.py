"""Solarize ties: where two correct appliers may land on the two sides of the solarize step.

A resampled value within float32 rounding of the threshold is solarized by one applier and not
by the other; the two results then differ by about one 8-bit level. Comparisons against the
reference exclude exactly those elements (and check that they are rare).
"""

import torch

from empssl.augment import params as AP

SOLARIZE_TIE = 1e-5  # how close to the threshold (in [0, 1] units) both values must be


def unnormalise(x, config):
    """Patches back in [0, 1] units (before the mean/std normalisation)."""
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return x.float() * std + mean


def solarize_ties(out, ref, params, config):
    """Elements where out and ref landed on the two sides of the solarize step (both next to it)."""
    threshold = config.solarize_threshold
    solarized = (params[:, AP.SOLARIZE] == 1.0).view(-1, 1, 1, 1)
    near = lambda x: torch.minimum((x - threshold).abs(), (x - (1 - threshold)).abs()) <= SOLARIZE_TIE  # noqa: E731
    out_unit, ref_unit = unnormalise(out, config), unnormalise(ref, config)
    flipped = (out_unit - ref_unit).abs() > 1e-3  # the two sides of the step differ by about 1/255
    return solarized & near(out_unit) & near(ref_unit) & flipped
