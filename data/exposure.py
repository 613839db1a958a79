"""Exposure variety for training: synthetic inputs made from a pair's well-lit ``high`` image.

Real low-light pairs (LOL) only ever map a dark input to a well-lit target, so a model trained on them alone
brightens everything, an already well-lit photo included. :class:`ExposureSynthesis` replaces a share of the
training inputs by synthetic exposures of the target itself:

- ``dark``: darker in linear light with realistic sensor noise (:class:`data.degradation.LowLightDegradation`),
  so the model learns to output clean images from noisy dark ones;
- ``identity``: the target itself, so a well-lit input comes out close to unchanged;
- ``bright``: over-exposed in linear light (clipped highlights), so the model never adds light that is not
  needed.

Arrays are HxWx3 float in [0, 1] (sRGB).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence

import numpy as np

from data.degradation import LowLightDegradation, linear_to_srgb, quantize_8bit, srgb_to_linear
from utils.config import SynthKind

KINDS = typing.get_args(SynthKind)


class ExposureSynthesis:
    """With probability ``prob`` replace a pair's input by a synthetic exposure of its target.

    kinds: drawn uniformly per replaced pair (repeat a kind to weight it). dark_exposure: how many times darker
    (linear light) a ``dark`` input is, log-uniform. bright_exposure: the same for ``bright`` (times brighter).
    """

    def __init__(self, prob: float, kinds: Sequence[str] = KINDS, *,
                 dark_exposure: tuple[float, float] = (3.0, 40.0),
                 bright_exposure: tuple[float, float] = (1.3, 3.0)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty list of {list(KINDS)}, got {list(kinds)}")
        self.prob = prob
        self.kinds = tuple(kinds)
        self.darken = LowLightDegradation(exposure_range=dark_exposure)
        self.bright_exposure = bright_exposure

    def __call__(self, low: np.ndarray, high: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) -> (new low, high); ``low`` is kept with probability 1 - prob."""
        if rng.random() >= self.prob:
            return low, high
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        if kind == "identity":
            return high.copy(), high
        if kind == "dark":
            return self.darken(np.ascontiguousarray(high, dtype=np.float32), rng), high
        gain = float(np.exp(rng.uniform(*np.log(self.bright_exposure))))
        return quantize_8bit(linear_to_srgb(srgb_to_linear(high) * gain)), high
