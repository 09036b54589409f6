"""Embedding stage: a stateful embedder run with Ray Data ``map_batches`` on an actor pool.

Embedders share one interface — ``Embedder(config).embed(list of uint8 H×W×3) -> (N, D) float32`` — so a
ViT backbone plugs in next to the weights-free default without touching the pipeline:

- ``handcrafted`` (default, RudolfV-style): colour statistics in RGB, LAB, HSV and HED (stain) space,
  texture (gradient, Laplacian) and morphology (stain-mass radial profiles), plus a dihedral-invariant
  low-frequency spectrum of the gray image. Every feature is invariant to flips and 90° rotations and
  computed at a fixed working size, so re-encoded / flipped / rotated / resized copies land close together.
- ``vit``: a cytoray ViT backbone from a checkpoint (DINOv2 hub, DinoBloom release or cytoray export);
  normalised CLS token.

Output vectors are float32 and L2-normalised. Handcrafted features have very different ranges, so they are
z-scored per dimension with the run's own mean and standard deviation (a streaming second pass over the
small feature table, recorded in ``embeddings.json``) before normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

WORK_SIZE = 64  # handcrafted features are computed on a WORK_SIZE×WORK_SIZE resample
RINGS = 8
SPECTRUM = 8  # low-frequency block of the |FFT| (SPECTRUM×SPECTRUM, dihedral-symmetrised)

_HED_FROM_RGB = np.linalg.inv(np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]))


@dataclass
class EmbedConfig:
    """Which embedder and how it runs on Ray Data."""

    name: str = "handcrafted"  # handcrafted | vit
    checkpoint: str | None = None  # vit: checkpoint URI (DINOv2 hub, DinoBloom, cytoray export)
    arch: str | None = None  # vit: architecture when the checkpoint does not record it
    image_size: int = 224  # vit: input size
    batch_size: int = 64
    concurrency: int = 2  # actor pool size
    num_cpus: float = 0.5  # per actor
    num_gpus: float = 0.0  # per actor; set >0 on GPU clusters


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


class HandcraftedEmbedder:
    name = "handcrafted"

    def __init__(self, cfg: EmbedConfig):
        self.cfg, self.dim = cfg, HANDCRAFTED_DIM

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([handcrafted_features(im) for im in images]) if images else np.zeros((0, self.dim), np.float32)


class ViTEmbedder:
    """Normalised CLS token of a cytoray ViT loaded from any supported checkpoint format."""

    name = "vit"

    def __init__(self, cfg: EmbedConfig):
        import torch

        from cytoray.platform.models.checkpoints import build_from_checkpoint

        if not cfg.checkpoint:
            raise ValueError("embed.name=vit needs embed.checkpoint (a DINOv2, DinoBloom or cytoray checkpoint URI)")
        overrides = {"arch": cfg.arch} if cfg.arch else {}
        self.model = build_from_checkpoint(cfg.checkpoint, **overrides).eval()
        self.device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.cfg, self.dim = cfg, self.model.embed_dim

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        size = self.cfg.image_size
        x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        with torch.no_grad():
            out = self.model(((t - mean) / std).to(self.device))
        return out.float().cpu().numpy()


EMBEDDERS = {"handcrafted": HandcraftedEmbedder, "vit": ViTEmbedder}


def get_embedder(cfg: EmbedConfig):
    if cfg.name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {cfg.name!r}; choose one of {sorted(EMBEDDERS)}")
    return EMBEDDERS[cfg.name](cfg)


class EmbedBatch:
    """Ray Data actor: load the embedder once (``__init__``), embed batches of manifest rows (``__call__``)."""

    def __init__(self, cfg: EmbedConfig, storage_cfg):
        self.embedder, self.storage_cfg = get_embedder(cfg), storage_cfg

    def __call__(self, batch):
        import pyarrow as pa

        from cytoray import images, storage

        uris = batch.column("uri").to_pylist()
        decoded = [images.decode(storage.read_bytes(u, self.storage_cfg), min_side=1).rgb for u in uris]
        feats = self.embedder.embed(decoded).astype(np.float32)
        return pa.table({"image_id": batch.column("image_id"),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), feats.shape[1])})


def standardise(features: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None):
    """z-score per dimension (stats from ``features`` unless given), then L2-normalise rows."""
    mean = features.mean(0) if mean is None else mean
    std = features.std(0) if std is None else std
    z = (features - mean) / np.maximum(std, 1e-6)
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32), mean, std



FINGERPRINT_SIZE = 32
FINGERPRINT_ZOOMS = (1.0, 1.08, 1.16)


def fingerprint_thumbnails(rgb_u8: np.ndarray, size: int = FINGERPRINT_SIZE,
                           zooms: tuple[float, ...] = FINGERPRINT_ZOOMS) -> np.ndarray:
    """(len(zooms), size, size) float32 near-duplicate fingerprints of one image.

    Each is the centre square (side = shorter side / zoom) as a size×size gray thumbnail with its mean
    removed: aspect changes do not stretch it, brightness/contrast changes barely move it after
    normalisation, and the zoomed variants match copies that were slightly cropped and resized back.
    Global colour statistics cannot tell a re-export from another cell of the same class and source;
    this instance fingerprint can (see ``dedup.dihedral_knn_edges``).
    """
    h, w = rgb_u8.shape[:2]
    gray = Image.fromarray(rgb_u8).convert("L")
    out = np.empty((len(zooms), size, size), np.float32)
    for z, zoom in enumerate(zooms):
        s = max(1, int(min(h, w) / zoom))
        top, left = (h - s) // 2, (w - s) // 2
        t = np.asarray(gray.resize((size, size), Image.BOX, box=(left, top, left + s, top + s)), np.float32)
        out[z] = t - t.mean()
    return out
