"""Features of manifest rows on a Ray Data actor pool: one actor class for curation's embed stage and for
evaluation.

:class:`FeatureActor` loads its extractor once (``__init__``) and, per batch of ``(image_id, uri)`` rows, decodes
every image once and returns ``image_id``, raw ``feature`` (FixedSizeList float32) and, when asked, the
copy-detection fingerprint columns (``features.fingerprint.FINGERPRINT_COLUMNS``). :func:`extract_table` runs it over a table (on an actor pool,
or in the calling process) and checks that every row comes back exactly once, in input order.
:func:`normalise` turns raw features into what search and probes use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytoray.features.backbone import HANDCRAFTED, backbone_preprocess, build_backbone, vit_features


@dataclass(frozen=True)
class FeatureSpec:
    """What to compute per image."""

    backbone: str = HANDCRAFTED  # handcrafted | random:<arch>[:<patch>:<img_size>] | checkpoint URI
    arch: str | None = None  # checkpoint URI: architecture when the checkpoint does not record it
    image_size: int | None = None  # ViT input side; None: the run's recorded crop size, else min(img_size, 224)
    cls_and_patch: bool = False  # ViT: CLS ‖ mean patch token
    fingerprints: bool = False  # also the copy-detection fingerprints (curation's dedup)


@dataclass(frozen=True)
class PoolSpec:
    """How the actor pool runs: ``actors`` = 0 extracts in the calling process (no nested pool, e.g. inside a
    per-checkpoint validation task)."""

    batch_size: int = 64
    actors: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0


class FeatureActor:
    """Ray Data actor: the extractor once per actor, features (+ fingerprints) per batch of rows."""

    def __init__(self, spec: FeatureSpec, storage_cfg=None, use_gpu: bool = False):
        from cytoray.runtime import keep_image_buffers_on_heap

        keep_image_buffers_on_heap()
        self.spec, self.storage_cfg = spec, storage_cfg
        if spec.backbone == HANDCRAFTED:
            self.model = None
            return
        import torch

        self.model, recorded = build_backbone(spec.backbone, storage_cfg, spec.arch)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.preprocess = backbone_preprocess(self.model, recorded, spec.image_size)

    def features(self, rgb: list[np.ndarray]) -> np.ndarray:
        if self.model is None:
            from cytoray.features.handcrafted import handcrafted_batch

            return handcrafted_batch(rgb)
        return vit_features(self.model, rgb, self.preprocess, self.device, self.spec.cls_and_patch)

    def __call__(self, batch):
        import pyarrow as pa

        from cytoray import images, storage
        from cytoray.features.fingerprint import fingerprint_columns
        from cytoray.tables import pack_vectors

        rgb = [images.decode(storage.read_bytes(u, self.storage_cfg), min_side=1).rgb
               for u in batch.column("uri").to_pylist()]
        out = {"image_id": batch.column("image_id"), "feature": pack_vectors(self.features(rgb).astype(np.float32))}
        if self.spec.fingerprints:
            out.update(fingerprint_columns(rgb))
        return pa.table(out)


def extract_table(rows, spec: FeatureSpec, pool: PoolSpec, storage_cfg=None, what: str = "features"):
    """(image_id, uri) rows -> FeatureActor's table, in ``rows`` order; every row must come back exactly once."""
    import pyarrow as pa

    ctor = {"spec": spec, "storage_cfg": storage_cfg, "use_gpu": pool.num_gpus > 0}
    if pool.actors > 0:
        return map_rows_on_actor_pool(rows, FeatureActor, ctor, pool, what)
    actor = FeatureActor(**ctor)
    parts = [actor(rows.slice(i, pool.batch_size)) for i in range(0, rows.num_rows, pool.batch_size)]
    return pa.concat_tables(parts) if parts else actor(rows)


def map_rows_on_actor_pool(rows, actor_cls, ctor_kwargs: dict, pool: PoolSpec, what: str):
    """Run a Ray Data actor class over (image_id, uri) rows; returns its output table in ``rows`` order.

    Blocks are cut on the driver (>= 4 per actor, at most ``batch_size`` rows); every row must come back
    exactly once (checked)."""
    import pyarrow as pa
    import ray

    from cytoray.runtime import data_context

    n = rows.num_rows
    per = max(1, min(pool.batch_size, -(-n // max(1, 4 * pool.actors))))
    with data_context(op_resource_reservation_enabled=False):
        ds = ray.data.from_arrow([rows.slice(i, per) for i in range(0, n, per)] or [rows])
        ds = ds.map_batches(actor_cls, fn_constructor_kwargs=ctor_kwargs, batch_size=per, batch_format="pyarrow",
                            num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
                            compute=ray.data.ActorPoolStrategy(size=pool.actors))
        parts = [ray.get(ref) for ref in ds.to_arrow_refs()]
    table = pa.concat_tables(parts) if parts else None
    if table is None or table.num_rows != n:
        raise AssertionError(f"{what}: {0 if table is None else table.num_rows} outputs for {n} manifest rows")
    order = {k: i for i, k in enumerate(table.column("image_id").to_pylist())}
    if len(order) != n:
        raise ValueError(f"{what}: image_id values are not unique")
    return table.take([order[k] for k in rows.column("image_id").to_pylist()])  # input order


def normalise(raw: np.ndarray, backbone: str) -> tuple[np.ndarray, dict | None]:
    """Raw features -> unit-length rows. Handcrafted features differ in scale by orders of magnitude, so they
    are z-scored per dimension first; returns the z-score statistics (None for ViT features)."""
    if backbone == HANDCRAFTED:
        from cytoray.features.handcrafted import standardise

        x, mean, std = standardise(raw)
        return x, {"mean": mean.tolist(), "std": std.tolist()}
    return (raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)).astype(np.float32), None
