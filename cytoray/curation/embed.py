"""Embed stage: every ingested image -> an embedding (for clustering and the balance metrics) and its copy-detection
fingerprints (dedup and the leakage guard), computed once per image by ``features.extract.FeatureActor`` on a Ray
Data actor pool.

Embedders: ``handcrafted`` (default; weights-free RudolfV-style features, ``features.handcrafted``) or ``vit``
(the normalised CLS token of a checkpoint: DINOv2 hub, DinoBloom release or cytoray export/training checkpoint,
preprocessed as its run recorded). Vectors are float32 and L2-normalised; handcrafted features are z-scored per
dimension with the run's own statistics first (recorded in the stage marker). The stage writes
``embeddings.parquet`` (image_id, embedding, and the fingerprint columns of ``features.fingerprint``) in manifest
order; users may bring their own embeddings for clustering and balancing (``embeddings=`` in the curation config).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cytoray.config import location_field
from cytoray.features.extract import FeatureSpec, PoolSpec

log = logging.getLogger(__name__)
EMBEDDERS = ("handcrafted", "vit")


@dataclass
class EmbedConfig:
    """Which embedder and how it runs on Ray Data."""

    name: str = "handcrafted"  # handcrafted | vit
    checkpoint: str | None = location_field()  # vit: checkpoint URI (DINOv2 hub, DinoBloom, cytoray export or run checkpoint)
    arch: str | None = None  # vit: architecture when the checkpoint does not record it
    image_size: int | None = None  # vit: input size; None: the checkpoint's recorded crop size, else 224
    batch_size: int = 64
    concurrency: int = 2  # actor pool size
    num_cpus: float = 0.5  # per actor
    num_gpus: float = 0.0  # per actor; set >0 on GPU clusters


def feature_spec(cfg: EmbedConfig) -> FeatureSpec:
    """The features the embedder computes (always with fingerprints); checks the config."""
    if cfg.name not in EMBEDDERS:
        raise ValueError(f"unknown embedder embed.name={cfg.name!r}; choose one of {list(EMBEDDERS)}")
    if cfg.name == "vit" and not cfg.checkpoint:
        raise ValueError("embed.name=vit needs embed.checkpoint (a DINOv2, DinoBloom or cytoray checkpoint URI)")
    backbone = "handcrafted" if cfg.name == "handcrafted" else cfg.checkpoint
    return FeatureSpec(backbone=backbone, arch=cfg.arch, image_size=cfg.image_size, fingerprints=True)


def embed_rows(rows, cfg: EmbedConfig, storage_cfg=None):
    """(image_id, uri) rows -> table (image_id, raw ``feature``, fingerprint columns) in the same order."""
    from cytoray.features.extract import extract_table

    pool = PoolSpec(cfg.batch_size, cfg.concurrency, cfg.num_cpus, cfg.num_gpus)
    return extract_table(rows, feature_spec(cfg), pool, storage_cfg, "embed")


def run_embed(out_uri: str, cfg: EmbedConfig, storage_cfg=None, force: bool = False) -> dict:
    """Embed stage: ``ingested.parquet`` -> ``embeddings.parquet`` (image_id; ``embedding`` float32,
    L2-normalised; the fingerprint columns) in manifest order."""
    from cytoray.curation.stage import run_stage

    spec = feature_spec(cfg)  # bad settings fail before any stage state changes
    return run_stage("embed", out_uri, cfg, lambda run: _embed(run, cfg, spec, storage_cfg), storage_cfg, force)


def _embed(run, cfg: EmbedConfig, spec: FeatureSpec, storage_cfg) -> dict:
    import pyarrow as pa

    from cytoray.features.extract import normalise
    from cytoray.tables import pack_vectors, unpack_vectors

    rows = run.read("ingested.parquet", ["image_id", "uri"])
    table = embed_rows(rows, cfg, storage_cfg)
    emb, stats = normalise(unpack_vectors(table.column("feature")), spec.backbone)
    from cytoray.features.fingerprint import FINGERPRINT_COLUMNS

    out = pa.table({"image_id": table.column("image_id"), "embedding": pack_vectors(emb),
                    **{c: table.column(c) for c in FINGERPRINT_COLUMNS.values()}})
    run.publish("embeddings.parquet", out, sort=False)  # manifest order
    meta = {"stage": "embed", "embedder": cfg.name, "count": rows.num_rows, "dim": int(emb.shape[1])}
    if stats is not None:
        meta["standardise"] = stats
    log.info("embed: %d images with %s (%d dims)", rows.num_rows, cfg.name, meta["dim"])
    return meta


def load_embeddings(out_uri: str, storage_cfg=None, fingerprints: bool = True):
    """(image_ids, embeddings (N, D) float32, fingerprints (``features.fingerprint.fingerprints_of_table``) or None)
    from ``embeddings.parquet``."""
    from cytoray import storage
    from cytoray.features.fingerprint import FINGERPRINT_COLUMNS, fingerprints_of_table
    from cytoray.tables import read_table, unpack_vectors

    columns = ["image_id", "embedding"] + (list(FINGERPRINT_COLUMNS.values()) if fingerprints else [])
    t = read_table(storage.join_uri(out_uri, "embeddings.parquet"), storage_cfg, columns=columns)
    return (t.column("image_id").to_pylist(), unpack_vectors(t.column("embedding")),
            fingerprints_of_table(t) if fingerprints else None)
