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
z-scored per dimension with the run's own mean and standard deviation (on the driver, over the small
feature table; recorded in the stage marker ``_stages/embed.json`` with the embedder's name and config)
before normalisation. The stage writes ``embeddings.parquet`` (image_id, embedding, fingerprint) in
manifest order; dedup and clustering read it, and users may bring their own with the same columns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

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
        return vit_features(self.model, images, self.cfg.image_size, self.device)


def vit_features(model, images: list[np.ndarray], size: int, device: str = "cpu",
                 cls_and_patch: bool = False) -> np.ndarray:
    """(N, D) float32 raw features of uint8 RGB images: bicubic resize to size×size, ImageNet normalisation,
    the backbone's normalised CLS token (optionally ‖ the mean patch token)."""
    import torch

    from cytoray.platform.data.augment import IMAGENET_MEAN, IMAGENET_STD

    x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model.forward_features(((t - mean) / std).to(device))
    f = out["x_norm_clstoken"]
    if cls_and_patch:
        f = torch.cat([f, out["x_norm_patchtokens"].mean(1)], dim=1)
    return f.float().cpu().numpy()


EMBEDDERS = {"handcrafted": HandcraftedEmbedder, "vit": ViTEmbedder}


def get_embedder(cfg: EmbedConfig):
    if cfg.name not in EMBEDDERS:
        raise ValueError(f"unknown embedder {cfg.name!r}; choose one of {sorted(EMBEDDERS)}")
    return EMBEDDERS[cfg.name](cfg)


class EmbedBatch:
    """Ray Data actor: load the embedder once (``__init__``), embed batches of manifest rows (``__call__``).

    Each image is decoded once for both outputs: the embedding (raw; standardised on the driver) and the
    near-duplicate fingerprint (uint8 thumbnails, lossless and 3 KB per image)."""

    def __init__(self, cfg: EmbedConfig, storage_cfg):
        from cytoray.runtime import keep_image_buffers_on_heap

        keep_image_buffers_on_heap()
        self.embedder, self.storage_cfg = get_embedder(cfg), storage_cfg

    def __call__(self, batch):
        import pyarrow as pa

        from cytoray import images, storage

        uris = batch.column("uri").to_pylist()
        decoded = [images.decode(storage.read_bytes(u, self.storage_cfg), min_side=1).rgb for u in uris]
        feats = self.embedder.embed(decoded).astype(np.float32)
        fps = np.stack([fingerprint_u8(im) for im in decoded]) if decoded else np.zeros((0, 1), np.uint8)
        fps = fps.reshape(len(decoded), -1)
        return pa.table({"image_id": batch.column("image_id"),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), feats.shape[1]),
                         "fingerprint": pa.FixedSizeListArray.from_arrays(pa.array(fps.ravel()), fps.shape[1])})


def standardise(features: np.ndarray, mean: np.ndarray | None = None, std: np.ndarray | None = None):
    """z-score per dimension (stats from ``features`` unless given), then L2-normalise rows."""
    mean = features.mean(0) if mean is None else mean
    std = features.std(0) if std is None else std
    z = (features - mean) / np.maximum(std, 1e-6)
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32), mean, std



FINGERPRINT_SIZE = 32
FINGERPRINT_ZOOMS = (1.0, 1.08, 1.16)


def fingerprint_u8(rgb_u8: np.ndarray, size: int = FINGERPRINT_SIZE,
                   zooms: tuple[float, ...] = FINGERPRINT_ZOOMS) -> np.ndarray:
    """(len(zooms), size, size) uint8 gray thumbnails of the centre square (side = shorter side / zoom)."""
    h, w = rgb_u8.shape[:2]
    gray = Image.fromarray(rgb_u8).convert("L")
    out = np.empty((len(zooms), size, size), np.uint8)
    for z, zoom in enumerate(zooms):
        s = max(1, int(min(h, w) / zoom))
        top, left = (h - s) // 2, (w - s) // 2
        out[z] = np.asarray(gray.resize((size, size), Image.BOX, box=(left, top, left + s, top + s)))
    return out


def fingerprints_from_u8(u8: np.ndarray) -> np.ndarray:
    """(N, Z, s, s) uint8 -> float32 thumbnails with each one's mean removed (what dedup compares)."""
    x = u8.astype(np.float32)
    return x - x.mean(axis=(-2, -1), keepdims=True)


def fingerprint_thumbnails(rgb_u8: np.ndarray, size: int = FINGERPRINT_SIZE,
                           zooms: tuple[float, ...] = FINGERPRINT_ZOOMS) -> np.ndarray:
    """(len(zooms), size, size) float32 near-duplicate fingerprints of one image.

    Each is the centre square (side = shorter side / zoom) as a size×size gray thumbnail with its mean
    removed: aspect changes do not stretch it, brightness/contrast changes barely move it after
    normalisation, and the zoomed variants match copies that were slightly cropped and resized back.
    Global colour statistics cannot tell a re-export from another cell of the same class and source;
    this instance fingerprint can (see ``dedup.dihedral_knn_edges``).
    """
    return fingerprints_from_u8(fingerprint_u8(rgb_u8, size, zooms)[None])[0]


def map_rows_on_actor_pool(rows, actor_cls, ctor_kwargs: dict, batch_size: int, actors: int, num_cpus: float,
                           num_gpus: float, what: str):
    """Run a Ray Data actor class over (image_id, uri) rows; returns its output table in ``rows`` order.

    Blocks are cut on the driver (>= 4 per actor, at most ``batch_size`` rows); every row must come back
    exactly once (checked)."""
    import pyarrow as pa
    import ray

    from cytoray.curation.ingest import data_context

    n = rows.num_rows
    per = max(1, min(batch_size, -(-n // max(1, 4 * actors))))
    with data_context(op_resource_reservation_enabled=False):
        ds = ray.data.from_arrow([rows.slice(i, per) for i in range(0, n, per)] or [rows])
        ds = ds.map_batches(actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=per, batch_format="pyarrow",
                            num_cpus=num_cpus, num_gpus=num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(size=actors))
        parts = [ray.get(ref) for ref in ds.to_arrow_refs()]
    table = pa.concat_tables(parts) if parts else None
    if table is None or table.num_rows != n:
        raise AssertionError(f"{what}: {0 if table is None else table.num_rows} outputs for {n} manifest rows")
    order = {k: i for i, k in enumerate(table.column("image_id").to_pylist())}
    if len(order) != n:
        raise ValueError(f"{what}: image_id values are not unique")
    return table.take([order[k] for k in rows.column("image_id").to_pylist()])  # input order


def embed_rows(manifest, cfg: EmbedConfig, storage_cfg=None):
    """(image_id, uri) rows -> table (image_id, raw ``embedding``, uint8 ``fingerprint``) in the same order,
    computed by ``EmbedBatch`` on a Ray Data actor pool."""
    return map_rows_on_actor_pool(manifest, EmbedBatch, {"cfg": cfg, "storage_cfg": storage_cfg}, cfg.batch_size,
                                  cfg.concurrency, cfg.num_cpus, cfg.num_gpus, "embed")


def run_embed(out_uri: str, cfg: EmbedConfig, storage_cfg=None, force: bool = False) -> dict:
    """Embedding stage: ``ingested.parquet`` -> ``embeddings.parquet`` (image_id; ``embedding`` float32,
    L2-normalised; ``fingerprint`` uint8) in manifest order, on a Ray Data actor pool. Skips if done."""
    import json
    from dataclasses import asdict

    import pyarrow as pa

    from cytoray import storage
    from cytoray.curation.ingest import _stage_marker, _write_table

    marker = _stage_marker(out_uri, "embed")
    if not force and storage.exists(marker, storage_cfg):
        return json.loads(storage.read_bytes(marker, storage_cfg))
    t0 = time.time()
    fs, out_path = storage.filesystem(out_uri, storage_cfg)
    manifest = storage.read_parquet(storage.join_uri(out_uri, "ingested.parquet"), storage_cfg, ["image_id", "uri"])
    n = manifest.num_rows
    table = embed_rows(manifest, cfg, storage_cfg)
    raw = np.asarray(table.column("embedding").combine_chunks().values, np.float32).reshape(n, -1)
    meta = {"stage": "embed", "embedder": cfg.name, "config": asdict(cfg), "count": n, "dim": int(raw.shape[1])}
    if cfg.name == "handcrafted":  # feature scales differ by orders of magnitude: z-score, then unit length
        emb, mean, std = standardise(raw)
        meta["standardise"] = {"mean": mean.tolist(), "std": std.tolist()}
    else:
        emb = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    table = table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]))
    _write_table(fs, table, f"{out_path}/embeddings.parquet", out_path)
    meta["seconds"] = round(time.time() - t0, 2)
    log.info("embed: %d images with %s (%d dims) in %.1fs", n, cfg.name, meta["dim"], meta["seconds"])
    storage.write_bytes(marker, json.dumps(meta).encode(), storage_cfg)
    return meta


def load_embeddings(out_uri: str, storage_cfg=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image_ids, embeddings (N, D) float32, fingerprints (N, Z, s, s) float32) from ``embeddings.parquet``."""

    from cytoray import storage

    t = storage.read_parquet(storage.join_uri(out_uri, "embeddings.parquet"), storage_cfg)
    emb = np.asarray(t.column("embedding").combine_chunks().values, np.float32).reshape(t.num_rows, -1)
    return t.column("image_id").to_pylist(), emb, fingerprints_of(t)


def fingerprints_of(table) -> np.ndarray:
    """The ``fingerprint`` column of an embed table (uint8, flattened) as (N, Z, s, s) float32 thumbnails."""
    fp = np.asarray(table.column("fingerprint").combine_chunks().values, np.uint8)
    return fingerprints_from_u8(fp.reshape(table.num_rows, len(FINGERPRINT_ZOOMS), FINGERPRINT_SIZE, FINGERPRINT_SIZE))
