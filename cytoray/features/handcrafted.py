"""Weights-free RudolfV-style image features: colour statistics in RGB, LAB, HSV and HED (stain) space,
texture (gradient, Laplacian) and morphology (stain-mass radial profiles), plus a dihedral-invariant low-frequency
spectrum of the gray image. Every feature is invariant to flips and 90° rotations and computed at a fixed working
size, so re-encoded / flipped / rotated / resized copies land close together.

The features have very different ranges, so a collection's features are z-scored per dimension with its own
mean and standard deviation (:func:`standardise`) before L2 normalisation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WORK_SIZE = 64  # handcrafted features are computed on a WORK_SIZE×WORK_SIZE resample
RINGS = 8
SPECTRUM = 8  # low-frequency block of the |FFT| (SPECTRUM×SPECTRUM, dihedral-symmetrised)

_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0,1] -> CIE L*a*b* (D65), vectorised."""
    lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    s = np.where(mx > 0, delta / np.maximum(mx, 1e-8), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-8)
    h = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) / 6.0
    h = np.where(delta > 0, h, 0.0)
    return np.stack([np.cos(2 * np.pi * h) * s, np.sin(2 * np.pi * h) * s, s, mx], -1)  # hue as a vector


def _radial_profile(x: np.ndarray, rings: int) -> np.ndarray:
    n = x.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) / (n / 2)
    idx = np.clip((r * rings).astype(int), 0, rings - 1)
    return np.bincount(idx.ravel(), weights=x.ravel(), minlength=rings) / np.bincount(idx.ravel(), minlength=rings)


def _dihedral_spectrum(gray: np.ndarray, k: int) -> np.ndarray:
    """|FFT| low-frequency block averaged over the 8 dihedral symmetries: invariant to flips, 90°
    rotations and (circular) shifts."""
    mag = np.abs(np.fft.fft2(gray - gray.mean()))
    block = np.fft.fftshift(mag)[gray.shape[0] // 2 - k // 2 : gray.shape[0] // 2 + k // 2 + 1,
                                 gray.shape[1] // 2 - k // 2 : gray.shape[1] // 2 + k // 2 + 1]
    sym = sum(np.rot90(b, r) for b in (block, block[::-1]) for r in range(4)) / 8
    iu = np.triu_indices(sym.shape[0])
    return np.log1p(sym[iu])


def handcrafted_features(rgb_u8: np.ndarray) -> np.ndarray:
    """One image -> raw feature vector (unstandardised)."""
    small = np.asarray(Image.fromarray(rgb_u8).resize((WORK_SIZE, WORK_SIZE), Image.BILINEAR), np.float64) / 255.0
    flat = small.reshape(-1, 3)
    lab = _rgb_to_lab(flat)
    hsv = _rgb_to_hsv(flat)
    od = -np.log(np.clip(flat, 1 / 255.0, 1.0))
    hed = od @ _HED_FROM_RGB
    gray = small @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(gray)
    grad = np.hypot(gx, gy)
    lap = np.abs(4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:])
    h_map = hed[:, 0].reshape(WORK_SIZE, WORK_SIZE)
    parts = [
        flat.mean(0), flat.std(0), lab.mean(0), lab.std(0), hsv.mean(0), hsv.std(0), hed.mean(0), hed.std(0),
        np.percentile(gray, [5, 25, 50, 75, 95]), [grad.mean(), grad.std(), lap.mean(), lap.std()],
        [(h_map > t).mean() for t in (0.3, 0.6, 0.9)],  # stain mass above thresholds (nucleus size)
        _radial_profile(gray, RINGS), _radial_profile(h_map, RINGS), _dihedral_spectrum(gray, SPECTRUM),
    ]
    return np.concatenate([np.ravel(p) for p in parts]).astype(np.float32)


HANDCRAFTED_DIM = len(handcrafted_features(np.zeros((8, 8, 3), np.uint8)))


def handcrafted_batch(images: list[np.ndarray]) -> np.ndarray:
    """(N, HANDCRAFTED_DIM) float32 raw features of uint8 RGB images."""
    if not images:
        return np.zeros((0, HANDCRAFTED_DIM), np.float32)
    return np.stack([handcrafted_features(im) for im in images]).astype(np.float32)


def standardise(features: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None):
    """z-score per dimension (stats from ``features`` unless given), then L2-normalise rows."""
    mean = features.mean(0) if mean is None else mean
    std = features.std(0) if std is None else std
    z = (features - mean) / np.maximum(std, 1e-6)
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32), mean, std
