"""Ingest stage: list datasets (adapters) -> Ray Data read + decode + validate -> manifest + quarantine.

Every listed image file ends up either in ``ingested.parquet`` (the manifest before deduplication: one
row per image; detection and segmentation fields give one row per cropped cell; sorted by ``image_id``) or in
``quarantine.parquet`` with a reason code (see :mod:`cytoray.images`). Files outside a layout are counted
in ``summary.json`` under ``ignored``. ``summary.json`` reconciles per dataset:
``input_files == kept_files + quarantined_files``.

The commit (sort + publish) runs in this process for small runs, one file; with ``scale.mode=ray`` (or ``auto``
above ``scale.ray_above`` listed files) Ray Data sorts the kept rows and one Ray task per sorted block writes
one part of an ``ingested.parquet/`` directory and returns the block's counts, so the driver never holds the
manifest. Both give the same rows in the same order and the same summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cytoray import images, storage
from cytoray.config import location_field
from cytoray.curation import taxonomy
from cytoray.curation.adapters import get_adapter
from cytoray.curation.shards import ScaleConfig, layout, map_shards, remove, use_ray, write_part
from cytoray.manifest import MANIFEST_SCHEMA, QUARANTINE_SCHEMA
from cytoray.runtime import data_context, keep_image_buffers_on_heap, working_dir_note

log = logging.getLogger(__name__)
MODALITIES = ("peripheral_blood", "bone_marrow")

_STAGED = pa.schema(list(MANIFEST_SCHEMA) + [("status", pa.string()), ("reason", pa.string()),
                                              ("detail", pa.string())])


@dataclass
class DatasetSpec:
    """One input dataset: where it lives and which published layout it follows."""

    name: str = "???"
    layout: str = "???"  # see cytoray.curation.adapters.ADAPTERS
    uri: str = location_field("???")  # local dir, file://, s3://bucket/prefix, ...; relative: to the working dir
    modality: str = "peripheral_blood"  # peripheral_blood | bone_marrow
    options: dict = field(default_factory=dict)  # layout-specific, e.g. {table: labels.parquet}


@dataclass
class CropConfig:
    """How detection/segmentation fields become single-cell images."""

    margin: float = 0.15  # extra context around the annotation, as a fraction of its larger side
    size: int = 0  # square output side in pixels; 0 keeps the (margin-expanded) box size


@dataclass
class IngestConfig:
    min_side: int = 16  # images smaller than this (pixels) are quarantined as too_small
    max_pixels: int = 50_000_000  # larger (width*height, from the header) are quarantined as too_large
    batch_size: int = 1024  # most files per decode task (larger amortises the per-task overhead)
    # CPUs per decode task. 1.0 measured fastest for ingest alone (benchmarks/RESULTS.md); lower it when
    # other Ray work shares the nodes, or tasks queue behind each other.
    num_cpus: float = 1.0
    # Ray Data reserves a share of the cluster per operator by default; on small nodes that runs the
    # decode tasks one at a time (measured 2.7x slower on 2 CPUs, benchmarks/RESULTS.md). Off by default.
    op_resource_reservation: bool = False
    crop: CropConfig = field(default_factory=CropConfig)


def _image_id(dataset: str, relpath: str, index: int | None = None) -> str:
    return f"{dataset}/{relpath}" + (f"#{index}" if index is not None else "")


def validate_specs(specs: list[DatasetSpec], storage_cfg: storage.StorageConfig | None = None,
                   check_files: bool = False) -> None:
    """Fail before any work with a message naming the dataset and the fix; with ``check_files`` also stat each
    root and its required label files and find an image file in it (a few requests per dataset:
    ``Adapter.check``)."""
    from cytoray.config import ConfigError
    from cytoray.curation.adapters import AdapterError

    names = Counter(s.name for s in specs)
    if not specs:
        raise ConfigError("no datasets configured: add entries under `datasets:` (name, layout, uri, modality)")
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise ConfigError(f"dataset names must be unique; repeated: {dup}")
    for s in specs:
        for k in ("name", "layout", "uri"):
            if getattr(s, k) in (None, "", "???"):
                raise ConfigError(f"dataset {s.name!r}: `{k}` is required")
        if "/" in s.name or "#" in s.name:
            raise ConfigError(f"dataset name {s.name!r} may not contain '/' or '#'")
        if s.modality not in MODALITIES:
            raise ConfigError(f"dataset {s.name!r}: modality {s.modality!r} is not one of {MODALITIES}")
        adapter = get_adapter(s.layout, s.options)  # raises for unknown layouts
        if check_files:
            fs, root = storage.filesystem(s.uri, storage_cfg)
            try:
                adapter.check(fs, root, s.uri)
            except AdapterError as exc:  # a relative root missing in a `ray job submit` working-dir copy says so
                raise AdapterError(f"dataset {s.name!r}: {exc}{working_dir_note(storage.absolute(s.uri))}") from None


def list_inputs(specs: list[DatasetSpec], storage_cfg: storage.StorageConfig) -> tuple[pa.Table, dict]:
    """Run every adapter (on the driver: listing is metadata only). Returns (records table, ignored info)."""
    rows, ignored = [], {}
    for s in specs:
        root_uri = storage.absolute(s.uri)  # every manifest names its images absolutely (or on object storage)
        fs, root = storage.filesystem(root_uri, storage_cfg)
        listing = get_adapter(s.layout, s.options).list(fs, root, root_uri)
        ignored[s.name] = {"count": len(listing.ignored), "examples": listing.ignored[:10],
                           "metadata_files": len(listing.metadata_files)}
        for r in listing.records:
            rows.append({
                "dataset": s.name, "layout": s.layout, "modality": s.modality, "uri": r.uri, "relpath": r.relpath,
                "source_label": None if r.source_label is None else str(r.source_label),
                "patient_id": r.patient_id, "patient_label": r.patient_label, "split": r.split,
                "boxes": r.boxes, "box_labels": r.box_labels, "mask_uris": r.mask_uris,
            })
        log.info("listed %s (%s): %d image files, %d ignored", s.name, s.layout, len(listing.records),
                 len(listing.ignored))
    schema = pa.schema([("dataset", pa.string()), ("layout", pa.string()), ("modality", pa.string()),
                        ("uri", pa.string()), ("relpath", pa.string()), ("source_label", pa.string()),
                        ("patient_id", pa.string()), ("patient_label", pa.string()), ("split", pa.string()),
                        ("boxes", pa.list_(pa.list_(pa.int32()))), ("box_labels", pa.list_(pa.string())),
                        ("mask_uris", pa.list_(pa.string()))])
    return pa.Table.from_pylist(rows, schema=schema), ignored


def _crop_box(box, width, height, crop: CropConfig) -> list[int]:
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * crop.margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = side / 2
    return [int(max(0, cx - half)), int(max(0, cy - half)), int(min(width, cx + half)), int(min(height, cy + half))]


def _mask_box(data: bytes, uri: str) -> list[int] | None:
    try:
        m = np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 0
    except Exception as exc:
        raise images.ImageRejected("annotation_error", f"mask {uri} unreadable: {exc}") from None
    if not m.any():
        return None
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


class DecodeBatch:
    """map_batches callable: read each file, decode + validate, emit manifest or quarantine rows."""

    def __init__(self, cfg: IngestConfig, storage_cfg: storage.StorageConfig, crops_uri: str):
        self.cfg, self.storage_cfg, self.crops_uri = cfg, storage_cfg, crops_uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        keep_image_buffers_on_heap()
        out = []
        for rec in batch.to_pylist():
            try:
                out.extend(self._one(rec))
            except images.ImageRejected as exc:
                out.append(self._reject(rec, exc.reason, exc.detail))
            except OSError as exc:  # read failed after retries (missing object, permissions, network)
                out.append(self._reject(rec, "unreadable", f"{type(exc).__name__}: {exc}"[:500]))
            # Anything else is a bug, not bad data: it fails the run loudly rather than hiding in quarantine.
        return pa.Table.from_pylist(out, schema=_STAGED)

    def _reject(self, rec, reason, detail):
        return {"uri": rec["uri"], "dataset": rec["dataset"], "image_id": _image_id(rec["dataset"], rec["relpath"]),
                "source_uri": rec["uri"], "status": "quarantined", "reason": reason, "detail": detail}

    def _row(self, rec, uri, image_id, rgb, label, data, fmt, frames, box=None):
        return {
            "image_id": image_id, "uri": uri, "dataset": rec["dataset"], "modality": rec["modality"],
            "source_label": label, "cell_type": taxonomy.unify(rec["layout"], label),
            "patient_id": rec["patient_id"], "patient_label": rec["patient_label"],
            "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
            "content_sha256": hashlib.sha256(data).hexdigest(), "pixel_sha256": images.pixel_sha256(rgb),
            "source_uri": rec["uri"], "crop_box": box, "split": rec["split"], "format": fmt,
            "num_frames": frames, "num_bytes": len(data), "status": "kept",
        }

    def _one(self, rec) -> list[dict]:
        data = storage.read_bytes(rec["uri"], self.storage_cfg)
        dec = images.decode(data, self.cfg.min_side, self.cfg.max_pixels, settings="ingest")
        image_id = _image_id(rec["dataset"], rec["relpath"])
        if rec["boxes"] is None and rec["mask_uris"] is None:
            return [self._row(rec, rec["uri"], image_id, dec.rgb, rec["source_label"], data, dec.format,
                              dec.num_frames)]
        # A detection/segmentation field: one cropped image per annotated white cell.
        if rec["boxes"] is not None:
            boxes, labels = rec["boxes"], rec["box_labels"] or [None] * len(rec["boxes"])
        else:
            boxes = [_mask_box(storage.read_bytes(u, self.storage_cfg), u) for u in rec["mask_uris"]]
            labels = [rec["source_label"]] * len(boxes)
            boxes = [b for b in boxes if b is not None]
        if not boxes:
            raise images.ImageRejected("no_annotated_cells", "field has no white-cell annotation to crop")
        h, w = dec.rgb.shape[:2]
        rows = []
        for k, (box, label) in enumerate(zip(boxes, labels)):
            x0, y0, x1, y1 = _crop_box(box, w, h, self.cfg.crop)
            if x1 - x0 < self.cfg.min_side or y1 - y0 < self.cfg.min_side:
                raise images.ImageRejected("annotation_error", f"box {box} of cell {k} is outside/too small")
            crop = dec.rgb[y0:y1, x0:x1]
            if self.cfg.crop.size:
                crop = np.asarray(Image.fromarray(crop).resize((self.cfg.crop.size,) * 2, Image.BICUBIC))
            png = images.encode_png(crop)
            stem = posixpath.splitext(rec["relpath"])[0]
            uri = storage.join_uri(self.crops_uri, rec["dataset"], f"{stem}__cell{k}.png")
            storage.write_bytes(uri, png, self.storage_cfg)
            rows.append(self._row(rec, uri, _image_id(rec["dataset"], rec["relpath"], k), crop, label, png, "PNG", 1,
                                  [x0, y0, x1, y1]))
        return rows


def run_ingest(specs: list[DatasetSpec], out_uri: str, cfg: IngestConfig | None = None,
               storage_cfg: storage.StorageConfig | None = None, force: bool = False,
               scale: ScaleConfig | None = None) -> dict:
    """Ingest ``specs`` into ``out_uri``; returns the summary (also ``summary.json``). ``scale`` picks where the
    commit runs (module doc); it does not change the outputs' rows, so it is not part of the stage settings."""
    from cytoray.curation.stage import run_stage

    cfg, storage_cfg, scale = cfg or IngestConfig(), storage_cfg or storage.StorageConfig(), scale or ScaleConfig()
    validate_specs(specs)
    settings = {"datasets": specs, "ingest": cfg}
    return run_stage("ingest", out_uri, settings, lambda run: _ingest(run, specs, cfg, scale, storage_cfg),
                     storage_cfg, force)


def _ingest(run, specs: list[DatasetSpec], cfg: IngestConfig, scale: ScaleConfig,
            storage_cfg: storage.StorageConfig) -> dict:
    import ray

    t0 = time.time()
    records, ignored = list_inputs(specs, storage_cfg)
    num_inputs = records.num_rows
    ray_commit = use_ray(scale, num_inputs)  # decided on listed files (crops add rows; close enough)
    log.info("ingest: %d files listed in %.1fs; decoding with Ray Data", num_inputs, time.time() - t0)
    fs, staging = storage.filesystem(run.staging, storage_cfg)
    pa_fs, _ = storage.arrow_filesystem(run.staging, storage_cfg)

    # Blocks cut on the driver (no all-to-all repartition: that would be a barrier before any decoding),
    # in a seeded random order so that datasets of large images do not all land in the last blocks.
    records = records.take(np.random.default_rng(0).permutation(num_inputs))
    # Each task has a fixed cost on the worker (~50 ms measured), so blocks are as large as batch_size
    # allows, but small inputs still get >= 4 blocks per CPU to keep every core busy.
    cpus = max(1.0, ray.cluster_resources().get("CPU", 1.0))
    rows_per_block = max(1, min(cfg.batch_size, -(-num_inputs // int(4 * cpus))))
    # The context is captured when the Dataset is built, so it is set around construction and execution.
    with data_context(op_resource_reservation_enabled=cfg.op_resource_reservation):
        ds = ray.data.from_arrow([records.slice(i, rows_per_block) for i in range(0, num_inputs, rows_per_block)])
        # Stateless decode: plain tasks (no actor start-up), fractional CPUs so the driver keeps headroom.
        ds = ds.map_batches(DecodeBatch(cfg, storage_cfg, run.uri("crops")),
                            batch_size=rows_per_block, batch_format="pyarrow", num_cpus=cfg.num_cpus)
        # Same resources as the decode step, so Ray Data fuses decode and write into one task per block (no
        # object-store hop; measured 1.2-2x faster than a separate write operator on 2 CPUs).
        ds.write_parquet(staging, filesystem=pa_fs, partition_cols=["status"],
                         ray_remote_args={"num_cpus": cfg.num_cpus})

    t_exec = time.time()
    log.info("ingest: decode + validate done in %.1fs (%.0f files/s)", t_exec - t0,
             num_inputs / max(t_exec - t0, 1e-9))
    kept_dir, q_dir = f"{staging}/status=kept", f"{staging}/status=quarantined"
    out = run.uri("ingested.parquet")
    remove(out, storage_cfg)  # a file (this process) or a directory of parts (Ray tasks) from an earlier run
    if ray_commit:
        kept_uri = storage.join_uri(run.staging, "status=kept") if fs.exists(kept_dir) else None
        counts = _commit_on_ray(kept_uri, out, cfg, scale, storage_cfg)
    else:
        manifest = _read_dir(fs, kept_dir) if fs.exists(kept_dir) else MANIFEST_SCHEMA.empty_table()
        manifest = manifest.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
        run.publish("ingested.parquet", manifest)  # sorted by the first column, image_id
        counts = manifest_counts(manifest)
    quarantine = _read_dir(fs, q_dir).select(QUARANTINE_SCHEMA.names) if fs.exists(q_dir) else \
        QUARANTINE_SCHEMA.empty_table()
    run.publish("quarantine.parquet", quarantine.cast(QUARANTINE_SCHEMA))

    summary = summarize(records, counts, quarantine, ignored)
    log.info("ingest: committed and summarised in %.1fs", time.time() - t_exec)
    run.publish_bytes("summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _commit_on_ray(kept_uri: str | None, out: str, cfg: IngestConfig, scale: ScaleConfig,
                   storage_cfg: storage.StorageConfig) -> Counter:
    """Sort the staged kept rows by image_id with Ray Data and write them as ``out/part-<i>.parquet`` in sorted
    order, one Ray task per sorted block; returns the summed :func:`manifest_counts`. The driver holds block
    references and counts only."""
    import ray

    if kept_uri is None:  # nothing kept: an empty dataset is still a readable one
        write_part(out, 0, MANIFEST_SCHEMA.empty_table(), storage_cfg)
        return Counter()
    rows = layout(kept_uri, storage_cfg).rows  # footers only
    pa_fs, kept_dir = storage.arrow_filesystem(kept_uri, storage_cfg)
    # The sort cuts the rows into as many ranges as the read's estimated blocks, or, when the reader gives no
    # estimate (the Parquet reader lists lazily), default_hash_shuffle_parallelism (200 by default, whatever
    # the size): ranges of ~shard_rows rows each, one part per range.
    num_parts = max(1, -(-rows // scale.shard_rows))
    with data_context(op_resource_reservation_enabled=cfg.op_resource_reservation,
                      default_hash_shuffle_parallelism=num_parts):
        ds = ray.data.read_parquet(kept_dir, filesystem=pa_fs, columns=MANIFEST_SCHEMA.names,
                                   num_cpus=scale.num_cpus)
        # Materialised in the object store (spilled if need be); the references come back in sorted order.
        blocks = ds.sort("image_id").to_arrow_refs()
    counts = map_shards(_commit_block, list(enumerate(blocks)), out, storage_cfg, ray_tasks=True, cfg=scale,
                        desc="ingest: commit")
    log.info("ingest: %d kept rows sorted into %d parts", rows, len(blocks))
    return sum(counts, Counter())


def _commit_block(block, out: str, storage_cfg: storage.StorageConfig) -> Counter:
    """Ray task: one sorted block -> part ``index`` of ``out`` (empty blocks leave a gap; name order holds)."""
    import ray

    index, ref = block
    table = ray.get(ref)
    if table.num_rows == 0:
        return Counter()
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    write_part(out, index, table, storage_cfg)
    return manifest_counts(table)


def _read_dir(fs, path: str) -> pa.Table:
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    tables = [pq.read_table(io.BytesIO(fs.cat_file(p))) for p in files]
    tables = [t.drop_columns([c for c in ("status",) if c in t.column_names]) for t in tables]
    return pa.concat_tables(tables, promote_options="permissive") if tables else _STAGED.empty_table()


def _counts(table: pa.Table, keys: list[str]) -> dict:
    """{key tuple (or key): row count} via a pyarrow group-by (no per-row Python)."""
    if table.num_rows == 0:
        return {}
    g = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    cols = [g.column(k).to_pylist() for k in keys]
    return {(tuple(v) if len(v) > 1 else v[0]): n for *v, n in zip(*cols, g.column("count_all").to_pylist())}


def manifest_counts(manifest: pa.Table) -> Counter:
    """What the summary needs from manifest rows, as counts that add up over any split of the rows (sorted
    blocks, parts): ``(kind, dataset)`` for ``kept_images``, ``kept_files``, ``cropped_cells``;
    ``("cell_types", dataset, cell type or "unknown")``; ``("unknown_labels", dataset, source label)``.
    A file counts at one row: a whole image, or cell #0 of a field (a field's cells are kept all or none,
    numbered from 0; ``DecodeBatch._one``), so no block needs another's rows to count distinct files."""
    import pyarrow.compute as pc

    counts: Counter = Counter()
    if manifest.num_rows == 0:
        return counts
    crop = pc.is_valid(manifest.column("crop_box"))
    first_row = pc.or_(pc.invert(crop), pc.ends_with(manifest.column("image_id"), "#0"))
    for kind, rows in (("kept_images", manifest), ("kept_files", manifest.filter(first_row)),
                       ("cropped_cells", manifest.filter(crop))):
        counts.update({(kind, d): n for d, n in _counts(rows, ["dataset"]).items()})
    types = manifest.select(["dataset", "cell_type"]).set_column(
        1, "cell_type", pc.fill_null(manifest.column("cell_type"), "unknown"))
    counts.update({("cell_types", d, ct): n for (d, ct), n in _counts(types, ["dataset", "cell_type"]).items()})
    unknown_rows = manifest.filter(pc.and_(pc.is_null(manifest.column("cell_type")),
                                           pc.is_valid(manifest.column("source_label"))))
    counts.update({("unknown_labels", d, lab): n
                   for (d, lab), n in _counts(unknown_rows, ["dataset", "source_label"]).items()})
    return counts


def summarize(records: pa.Table, counts: Counter, quarantine: pa.Table, ignored: dict) -> dict:
    """Per-dataset accounting from the listing, :func:`manifest_counts` and the quarantine; raises if any input
    file is unaccounted for (a contract check)."""
    inputs = _counts(records, ["dataset"])
    reasons = _counts(quarantine, ["dataset", "reason"])
    per: dict[str, dict] = {}
    for name in inputs:
        q_reasons = {r: n for (d, r), n in reasons.items() if d == name}
        q = sum(q_reasons.values())
        per[name] = {
            "input_files": inputs[name], "kept_files": counts[("kept_files", name)], "quarantined_files": q,
            "kept_images": counts[("kept_images", name)], "cropped_cells": counts[("cropped_cells", name)],
            "quarantine_reasons": q_reasons,
            "unknown_labels": {k[2]: n for k, n in counts.items() if k[:2] == ("unknown_labels", name)},
            "cell_types": {k[2]: n for k, n in counts.items() if k[:2] == ("cell_types", name)},
            "ignored_files": ignored.get(name, {}).get("count", 0),
            "ignored_examples": ignored.get(name, {}).get("examples", []),
        }
        if per[name]["input_files"] != per[name]["kept_files"] + q:
            raise AssertionError(f"ingest accounting broken for {name}: {per[name]}")
    total = {k: sum(d[k] for d in per.values()) for k in
             ("input_files", "kept_files", "quarantined_files", "kept_images", "cropped_cells", "ignored_files")}
    return {"stage": "ingest", "datasets": per, "total": total}
