"""A labelled manifest from class folders or a label table, for probes and the leakage guard (``recipes/manifest.py``).

A held-out set is scored, not trained on: it is ingested like curation's inputs (the same adapters, decode checks
and quarantine, so every listed file is either in the manifest or in ``quarantine.parquet`` with its reason) and
exact copies (identical decoded pixels) are removed, so a probe never scores one picture twice. There is no
embedding, near-duplicate search, clustering or balancing: every other image is kept once.

Outputs in the run directory: ``manifest.parquet`` (the manifest columns, ``image_id``, absolute ``uri``,
``dataset``, ``source_label`` (the folder or table label), ``cell_type`` (unified, what the probe reads by default),
``patient_id``, ``split`` ...), ``quarantine.parquet``, ``duplicates.parquet``, ``summary.json`` and ``config.yaml``.
A held-out set is small enough to sit in this process whole (the probe reads it whole too), so the copy check runs
here on the ingested rows.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cytoray import config, console, storage, tables
from cytoray.curation.ingest import DatasetSpec, IngestConfig, run_ingest, validate_specs
from cytoray.curation.shards import ScaleConfig
from cytoray.manifest import DUPLICATES_SCHEMA, MANIFEST_SCHEMA
from cytoray.runtime import RayConfig, init_ray, setup_logging

TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass
class LabelledManifestConfig:
    """What ``recipes/manifest.py`` reads from --config files, key=value overrides and its --dataset/--out."""

    output_uri: str = config.location_field("???")  # run directory: manifest.parquet and its audit files
    datasets: list[DatasetSpec] = field(default_factory=list)  # any layout; --dataset adds one
    ingest: IngestConfig = field(default_factory=IngestConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    storage: storage.StorageConfig = field(default_factory=storage.StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    force: bool = False  # re-ingest even if the ingest marker is current
    log_level: str = "INFO"


def dataset_spec(uri: str, layout: str | None = None, name: str | None = None,
                 modality: str = "peripheral_blood") -> DatasetSpec:
    """``--dataset``: a folder of class folders (layout ``class_folders``) or a label table (.csv / .parquet with a
    ``uri`` column and ``label``: layout ``table``), named after the folder or table unless ``name`` is given."""
    uri = storage.absolute(uri).rstrip("/")
    is_table = uri.endswith(TABLE_SUFFIXES)
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    default_name = posixpath.basename(posixpath.dirname(uri)) if is_table else stem
    return DatasetSpec(name=name or default_name.replace("#", "_") or "heldout",
                       layout=layout or ("table" if is_table else "class_folders"), uri=uri, modality=modality)


def exact_copies(rows: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(keep mask, row each removed row copies or -1): per decoded-pixel hash the first row stays, labelled rows
    first, then the larger image, then ``image_id`` (curation's keep policy without dataset priorities)."""
    n = rows.num_rows
    labelled = pc.is_valid(rows.column("source_label")).to_numpy(zero_copy_only=False)
    area = (rows.column("width").to_numpy(zero_copy_only=False).astype(np.int64)
            * rows.column("height").to_numpy(zero_copy_only=False).astype(np.int64))
    ids = np.asarray(rows.column("image_id").to_pylist(), dtype=object)
    order = sorted(range(n), key=lambda i: (not labelled[i], -area[i], ids[i]))
    first: dict[str, int] = {}
    copy_of = np.full(n, -1, np.int64)
    hashes = rows.column("pixel_sha256").to_pylist()
    for i in order:
        h = hashes[i]
        if h in first:
            copy_of[i] = first[h]
        else:
            first[h] = i
    return copy_of < 0, copy_of


def build_labelled_manifest(cfg: LabelledManifestConfig) -> dict:
    """Ingest ``cfg.datasets`` into ``cfg.output_uri`` and publish the labelled manifest; returns the summary."""
    from cytoray.curation.pipeline import check_output_location

    cfg = config.to_object(cfg)
    out, st = cfg.output_uri, cfg.storage
    if out in (None, "", "???"):
        raise config.ConfigError("output_uri is required (--out DIR): where manifest.parquet is written")
    validate_specs(cfg.datasets, st, check_files=True)  # roots, label tables, an image in each: before Ray starts
    check_output_location(out, st)
    init_ray(cfg.ray)
    config.save_config(cfg, out, st)
    console.log_to(out, st)
    with console.stage("ingest"):
        ingest = run_ingest(cfg.datasets, out, cfg.ingest, st, force=cfg.force, scale=cfg.scale)
    rows = tables.read_table(storage.join_uri(out, "ingested.parquet"), st).select(MANIFEST_SCHEMA.names)
    keep, copy_of = exact_copies(rows)
    removed = np.flatnonzero(~keep)
    ids, datasets = rows.column("image_id").to_pylist(), rows.column("dataset").to_pylist()
    duplicates = pa.Table.from_pylist([
        {"image_id": ids[i], "duplicate_of": ids[copy_of[i]], "similarity": 1.0, "reason": "exact",
         "dataset": datasets[i], "duplicate_of_dataset": datasets[copy_of[i]], "transform": "identical pixels"}
        for i in removed], schema=DUPLICATES_SCHEMA)
    manifest = rows.filter(pa.array(keep))
    tables.write_table(storage.join_uri(out, "duplicates.parquet"), duplicates, st)
    tables.write_table(storage.join_uri(out, "manifest.parquet"), manifest, st)  # sorted by image_id
    summary = summarize(ingest, manifest, len(removed))
    storage.write_bytes(storage.join_uri(out, "summary.json"), json.dumps(summary, indent=2).encode(), st)
    return summary


def summarize(ingest: dict, manifest: pa.Table, exact: int) -> dict:
    """Counts that reconcile: input files = kept files + quarantined files; kept images = manifest rows + exact
    copies; the manifest's cell types, and the source labels outside the taxonomy (``cell_type`` null)."""
    t = ingest["total"]
    types = manifest.column("cell_type").fill_null("unknown").value_counts().to_pylist()
    unknown = manifest.filter(pc.and_(pc.is_null(manifest.column("cell_type")),
                                      pc.is_valid(manifest.column("source_label"))))
    summary = {"input_files": t["input_files"], "quarantined_files": t["quarantined_files"],
               "ignored_files": t["ignored_files"], "kept_images": t["kept_images"], "exact_copies": exact,
               "manifest_rows": manifest.num_rows,
               "cell_types": {d["values"]: d["counts"] for d in sorted(types, key=lambda d: -d["counts"])},
               "labels_outside_taxonomy": sorted(set(unknown.column("source_label").to_pylist())),
               "quarantine_reasons": dict(sum((Counter(d["quarantine_reasons"]) for d in ingest["datasets"].values()),
                                              Counter()))}
    if summary["manifest_rows"] + exact != t["kept_images"]:
        raise AssertionError(f"labelled manifest accounting broken: {summary}")
    return summary


def summary_lines(summary: dict, out: str) -> list[str]:
    """What the recipe prints: the counts, a note for labels outside the taxonomy, and the probe command."""
    s = summary
    types = ", ".join(f"{k} {v}" for k, v in s["cell_types"].items())
    copies = f"{s['exact_copies']} exact cop{'y' if s['exact_copies'] == 1 else 'ies'}"
    lines = [f"manifest: {s['input_files']} files -> {s['manifest_rows']} labelled images ({s['quarantined_files']} "
             f"quarantined, {copies} removed; {s['ignored_files']} hidden or outside the layout, not listed); "
             f"cell types: {types}"]
    if s["labels_outside_taxonomy"]:
        lines.append(f"labels outside the cell-type taxonomy (cell_type null): {s['labels_outside_taxonomy']}; "
                     "probe them by their own names with probe.label_column=source_label (docs/taxonomy.md)")
    path = storage.join_uri(out, "manifest.parquet")
    lines.append(f"labelled manifest: {path}  (python recipes/probe.py --checkpoint ... --manifest {path})")
    return lines


def main(argv: list[str]) -> dict:
    import argparse

    ap = argparse.ArgumentParser(description="a labelled manifest from class folders or a label table")
    ap.add_argument("--dataset", action="append", default=[],
                    help="folder of class folders, or a label table (.csv/.parquet: uri, label); repeatable")
    ap.add_argument("--layout", help="layout of every --dataset (default: class_folders, or table for .csv/.parquet)")
    ap.add_argument("--name", help="dataset name (default: the folder's name); only with one --dataset")
    ap.add_argument("--modality", default="peripheral_blood", help="peripheral_blood | bone_marrow")
    ap.add_argument("--out", help="output folder (output_uri): manifest.parquet, quarantine, duplicates, summary")
    args, rest = ap.parse_known_args(argv)
    files, overrides = config.split_cli(rest)
    if args.out:
        overrides.append(f"output_uri={args.out}")
    cfg = config.to_object(config.load_config(LabelledManifestConfig, files[0] if files else None, files[1:],
                                              overrides))
    if args.name and len(args.dataset) > 1:
        raise config.ConfigError("--name names one --dataset; give datasets in a --config file to name each")
    cfg.datasets += [dataset_spec(d, args.layout, args.name, args.modality) for d in args.dataset]
    if not cfg.datasets:
        raise config.ConfigError("give --dataset FOLDER_OR_TABLE (repeatable) or a --config file with `datasets:`")
    setup_logging(cfg.log_level)
    summary = build_labelled_manifest(cfg)
    for line in summary_lines(summary, cfg.output_uri):
        console.say(line)
    return summary
