"""Physically motivated synthesis of low-light images from well-exposed sRGB photographs.

Images are numpy float arrays HxWx3 in [0, 1] (sRGB-encoded). The model: decode sRGB to linear light,
apply a slight white-balance error (per-channel gains), divide by an exposure factor, simulate the
sensor (Poisson shot noise on photo-electrons plus Gaussian read noise), clip at black and at full
well, re-encode to sRGB and quantise to 8 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light in [0, 1] (IEC 61966-2-1 transfer function)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] -> sRGB-encoded values in [0, 1] (inverse of srgb_to_linear)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * x ** (1.0 / 2.4) - 0.055)


def quantize_8bit(x: np.ndarray) -> np.ndarray:
    """Round values in [0, 1] to the nearest multiple of 1/255 (what an 8-bit file stores); float32."""
    return (np.round(np.clip(x, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


@dataclass(frozen=True)
class DegradationParams:
    """The random draws behind one degraded image.

    exposure: the linear signal is divided by this (>= 1). full_well: photo-electrons at sensor
    saturation, i.e. per unit of the (already darkened) linear signal; sets the shot noise.
    read_noise: Gaussian read-noise standard deviation in electrons. channel_gains: per-channel
    (R, G, B) multipliers of the colour cast, mean 1.
    """

    exposure: float
    full_well: float
    read_noise: float
    channel_gains: tuple[float, float, float]


class LowLightDegradation:
    """Turn a well-exposed sRGB image into a noisy, under-exposed one; reproducible from a seed.

    exposure_range: the exposure factor is drawn log-uniformly in this range (default 3x to 30x darker
    in linear light). full_well_range: electrons per unit linear signal, drawn log-uniformly (smaller =
    noisier). read_noise_range: read-noise std in electrons, drawn uniformly. cast_strength: each
    channel gain is drawn uniformly in [1 - s, 1 + s], then the three are normalised to mean 1
    (0 disables the cast).
    """

    def __init__(
        self,
        exposure_range: tuple[float, float] = (3.0, 30.0),
        full_well_range: tuple[float, float] = (1000.0, 20000.0),
        read_noise_range: tuple[float, float] = (1.0, 10.0),
        cast_strength: float = 0.08,
    ):
        _check_range("exposure_range", exposure_range, minimum=1.0)
        _check_range("full_well_range", full_well_range, minimum=1e-9)
        _check_range("read_noise_range", read_noise_range, minimum=0.0)
        if not 0.0 <= cast_strength < 1.0:
            raise ValueError(f"cast_strength must be in [0, 1), got {cast_strength}")
        self.exposure_range = exposure_range
        self.full_well_range = full_well_range
        self.read_noise_range = read_noise_range
        self.cast_strength = cast_strength

    def sample_params(self, rng: np.random.Generator) -> DegradationParams:
        """Draw one set of degradation parameters."""
        gains = rng.uniform(1.0 - self.cast_strength, 1.0 + self.cast_strength, size=3)
        gains = gains / gains.mean()
        return DegradationParams(
            exposure=_log_uniform(rng, self.exposure_range),
            full_well=_log_uniform(rng, self.full_well_range),
            read_noise=float(rng.uniform(*self.read_noise_range)),
            channel_gains=(float(gains[0]), float(gains[1]), float(gains[2])),
        )

    def apply(self, img: np.ndarray, params: DegradationParams, rng: np.random.Generator) -> np.ndarray:
        """Degrade ``img`` (float HxWx3 in [0, 1], sRGB) with fixed ``params``; ``rng`` draws the noise.

        Returns float32 HxWx3 in [0, 1] on the 8-bit grid (every value is k/255).
        """
        img = _check_image(img)
        linear = srgb_to_linear(img) * np.asarray(params.channel_gains) / params.exposure
        electrons = rng.poisson(np.clip(linear, 0.0, None) * params.full_well).astype(np.float64)
        electrons += rng.normal(0.0, params.read_noise, size=electrons.shape)
        return quantize_8bit(linear_to_srgb(electrons / params.full_well))

    def degrade(
        self, img: np.ndarray, rng: np.random.Generator | int
    ) -> tuple[np.ndarray, DegradationParams]:
        """Draw parameters and noise from ``rng`` (a Generator or an integer seed) and degrade ``img``.

        Returns (low image float32 HxWx3 on the 8-bit grid, the drawn parameters).
        """
        rng = np.random.default_rng(rng)
        params = self.sample_params(rng)
        return self.apply(img, params, rng), params

    def __call__(self, img: np.ndarray, rng: np.random.Generator | int) -> np.ndarray:
        """The low-light version of ``img`` (see ``degrade``), without the parameters."""
        return self.degrade(img, rng)[0]


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    low, high = bounds
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _check_range(name: str, bounds: tuple[float, float], *, minimum: float) -> None:
    if len(bounds) != 2 or not minimum <= bounds[0] <= bounds[1]:
        raise ValueError(f"{name} must be (low, high) with {minimum} <= low <= high, got {bounds}")


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f"expected a float image in [0, 1], got dtype {img.dtype}")
    if not (np.all(np.isfinite(img)) and img.min() >= 0.0 and img.max() <= 1.0):
        raise ValueError("expected image values in [0, 1]")
    return img
