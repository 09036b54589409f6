"""The curation run: config schema and the stage sequence behind ``recipes/curate.py``.

Stages write into one run directory (local or object storage); ``curation.stage`` gives each a completion
marker (``_stages/<stage>.json``) with its settings and lineage, so a rerun skips what is finished and reruns
what a changed setting affects:

ingest (``ingested.parquet``, ``quarantine.parquet``) -> embed (``embeddings.parquet``) -> dedup + leakage
guard (``deduplicated.parquet``, ``duplicates.parquet``) -> cluster (``clusters.parquet``,
``centroids_l<t>.npy``) -> balance (``unbalanced.parquet``, ``balanced.parquet``,
``group_mapping_template.csv``) -> ``manifest.parquet`` (the balanced manifest), ``summary.json`` and
``report.html``. The summary reconciles per dataset: input files = kept files + quarantined files, images =
kept + duplicates (exact, near, leakage), and kept = sampled + not sampled.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from cytoray import config, console, storage
from cytoray.curation.balance import BalanceConfig, grouping_column
from cytoray.curation.balance_passes import run_balance
from cytoray.curation.cluster import ClusterConfig, run_cluster
from cytoray.curation.dedup import DedupConfig
from cytoray.curation.dedup_stage import run_dedup
from cytoray.curation.embed import EmbedConfig, run_embed
from cytoray.curation.ingest import DatasetSpec, IngestConfig, run_ingest
from cytoray.curation.report import ReportConfig, write_report
from cytoray.curation.shards import ScaleConfig
from cytoray.curation.stage import read_marker
from cytoray.runtime import RayConfig, init_ray, setup_logging

log = logging.getLogger(__name__)


@dataclass
class CurateConfig:
    output_uri: str = config.location_field("???")  # run directory: local path or s3://bucket/prefix
    datasets: list[DatasetSpec] = field(default_factory=list)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Where ingest's commit, dedup, cluster and balance run: this process, or Ray tasks over shards of the stage
    # files (auto: Ray above scale.ray_above images). Both give the same result (docs/curation.md, "Scale").
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    # Bring your own embeddings for clustering/balancing: Parquet (image_id, embedding) or .npy aligned with
    # deduplicated.parquet. Default: the embed stage's embeddings.parquet.
    embeddings: str | None = config.location_field()
    storage: storage.StorageConfig = field(default_factory=storage.StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    force: bool = False  # rerun stages even if their completion marker exists
    log_level: str = "INFO"


def run_curation(cfg: CurateConfig) -> dict:
    """Run every curation stage into ``cfg.output_uri``; returns {stage: summary}."""
    cfg = config.to_object(cfg)
    preflight(cfg)  # everything the run will read or write is checked before Ray starts or a file is written
    init_ray(cfg.ray)
    config.save_config(cfg, cfg.output_uri, cfg.storage)
    console.log_to(cfg.output_uri, cfg.storage)
    out, st, force = cfg.output_uri, cfg.storage, cfg.force
    stages = {
        "ingest": lambda: run_ingest(cfg.datasets, out, cfg.ingest, st, force=force, scale=cfg.scale),
        "embed": lambda: run_embed(out, cfg.embed, st, force=force),
        "dedup": lambda: run_dedup(out, cfg.dedup, st, force=force, embed_cfg=cfg.embed, scale=cfg.scale),
        "cluster": lambda: run_cluster(out, cfg.cluster, st, force=force, embeddings=cfg.embeddings,
                                       scale=cfg.scale),
        "balance": lambda: run_balance(out, cfg.balance, st, force=force, embeddings=cfg.embeddings,
                                       scale=cfg.scale),
    }
    results = {}
    for name, run in stages.items():
        before = read_marker(out, name, st)
        with console.stage(name):
            results[name] = run()
        # run_stage returns the marker it found when it skips, and writes a new one (new timing) when it runs
        done = "up to date" if results[name] == before else f"{results[name]['seconds']:.1f}s"
        console.say(f"{stage_line(name, results[name])} [{done}]")
        for warning in results[name].get("warnings", []):  # also when up to date: the run still has the problem
            log.warning(warning)
    results["summary"] = finalize(cfg.output_uri, results, cfg.storage)
    if cfg.report.enabled:
        results["report"] = write_report(cfg.output_uri, cfg.report, cfg.storage)
    return results


def stage_line(stage: str, summary: dict) -> str:
    """One line with a finished stage's counts."""
    if stage == "ingest":
        t = summary["total"]
        return (f"ingest: {t['input_files']} files -> {t['kept_images']} images kept ({t['cropped_cells']} cropped "
                f"cells), {t['quarantined_files']} quarantined, {t['ignored_files']} outside layouts")
    if stage == "embed":
        return f"embed: {summary['count']} images -> {summary['embedder']} features ({summary['dim']} dims)"
    if stage == "dedup":
        t, v = summary["total"], summary.get("verification", {})
        pairs = sum(v[k]["candidates"] for k in ("near", "leakage") if k in v)
        unverifiable = sum(v[k]["unverifiable"] for k in ("near", "leakage") if k in v)
        return (f"dedup: {t['images']} images -> {t['kept']} kept, {t['duplicates']} duplicates ({t['exact']} exact, "
                f"{t['near']} near, {t['cross_dataset']} across datasets), {t['leakage']} dropped by the leakage guard; "
                f"{pairs} candidate pairs verified ({unverifiable} unverifiable, kept)")
    if stage == "cluster":
        return f"cluster: {summary['images']} images -> levels {summary['levels']}"
    if stage == "balance":
        b, a = summary["before"], summary["after"]
        if not summary["enabled"]:
            return (f"balance: off (balance.enabled=false); {b['images']} kept -> {summary['sampled_images']} sampled "
                    f"images, each once: {summary['samples_per_epoch']} samples/epoch")
        return (f"balance: {b['images']} kept -> {summary['sampled_images']} sampled images, "
                f"{summary['samples_per_epoch']} samples/epoch; largest share before -> after: "
                f"{share_changes(summary['largest_share'], summary['groups_from'])}; kNN dataset mixing "
                f"{_score(b['knn_dataset_mixing'])} -> {_score(a['knn_dataset_mixing'])}")
    return f"{stage}: done"


def share_changes(shares: dict, groups_from: str) -> str:
    """``dataset (grouping) 0.30 -> 0.10, cell type 0.21 -> 0.36`` from the balance stage's ``largest_share``."""
    grouping = grouping_column(groups_from)
    return ", ".join(f"{name.replace('_', ' ')}{' (grouping)' if name == grouping else ''} "
                     f"{s['before']:.2f} -> {s['after']:.2f}" for name, s in shares.items())


def _score(x) -> str:
    """A score to two decimals, or its "n/a (...)" reason as it is."""
    return x if isinstance(x, str) else f"{x:.2f}"


def preflight(cfg: CurateConfig) -> None:
    """Check every input and the output location (a few requests each, nothing written): dataset specs, roots,
    required label files and an image file in each root (a listing with a limit), evaluation manifests (exist,
    ``uri`` column, the first images open), the embedder and its checkpoint, a bring-your-own embeddings file, the
    balance mapping file, the output location."""
    from cytoray import tables
    from cytoray.curation.dedup import read_eval_manifest
    from cytoray.curation.embed import feature_spec
    from cytoray.curation.ingest import validate_specs
    from cytoray.manifest import ManifestError, check_images
    from cytoray.runtime import working_dir_note

    st = cfg.storage
    if cfg.output_uri in (None, "", "???"):
        raise config.ConfigError("output_uri is required: the run directory (local path or s3://bucket/prefix)")
    validate_specs(cfg.datasets, st, check_files=True)
    for uri in cfg.dedup.eval_manifests:
        try:
            names = tables.read_schema(uri, st).names
        except FileNotFoundError:
            raise ManifestError(f"dedup.eval_manifests: {uri} does not exist{working_dir_note(uri)}") from None
        if "uri" not in names:
            raise ManifestError(f"dedup.eval_manifests: {uri} has no 'uri' column (columns: {names}); an "
                                "evaluation manifest lists its images by uri, like manifest.parquet")
        check_images(read_eval_manifest(uri, st), uri, st, purpose="dedup.eval_manifests")  # its first images open
    spec = feature_spec(cfg.embed)
    needed = [("embed.checkpoint", cfg.embed.checkpoint if spec.backbone != "handcrafted" else None),
              ("embeddings", cfg.embeddings), ("balance.mapping_file", cfg.balance.mapping_file)]
    for key, uri in needed:
        if uri and not storage.exists(uri, st):
            raise config.ConfigError(f"{key}={uri} does not exist")
    check_output_location(cfg.output_uri, st)


def check_output_location(uri: str, storage_cfg=None) -> None:
    """The run directory can be created (local: the nearest existing parent is a writable directory) or its
    bucket exists (object storage); an existing file in its place is an error."""
    import os

    protocol, path = storage.split_protocol(uri)
    if protocol == "file":
        if os.path.isfile(path):
            raise config.ConfigError(f"output_uri={uri} is a file; point it at a directory")
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
            raise config.ConfigError(f"output_uri={uri}: {parent} is not a writable directory")
        return
    fs, path = storage.filesystem(uri, storage_cfg)
    bucket = path.split("/", 1)[0]
    if not storage.with_retries(lambda: fs.exists(bucket), storage_cfg, f"stat {protocol}://{bucket}"):
        raise config.ConfigError(f"output_uri={uri}: bucket {protocol}://{bucket} does not exist or is not "
                                 "visible with these credentials")


def finalize(out_uri: str, results: dict, storage_cfg) -> dict:
    """Publish ``manifest.parquet`` (the balanced rows; with balancing off, every kept row with repeats=1) — a
    directory of part files, one per part of the balance stage's output, when the stage wrote one (Ray mode), so
    the rows never gather on the driver; write the reconciled ``summary.json``."""
    manifest_rows = publish_manifest(out_uri, "balanced.parquet", storage_cfg)
    ingest, dedup, bal = results["ingest"], results["dedup"], results["balance"]
    per = {}
    zero = {"kept": 0, "duplicates": 0, "exact": 0, "near": 0, "leakage": 0, "cross_dataset": 0}
    for name, d in ingest["datasets"].items():
        dd = dedup["datasets"].get(name, zero)
        bb = bal["datasets"].get(name, {"sampled_images": 0, "samples_per_epoch": 0})
        per[name] = {"input_files": d["input_files"], "quarantined_files": d["quarantined_files"],
                     "kept_files": d["kept_files"], "images": d["kept_images"], "cropped_cells": d["cropped_cells"],
                     "duplicates": dd["duplicates"], "exact_duplicates": dd["exact"], "near_duplicates": dd["near"],
                     "leakage": dd.get("leakage", 0), "cross_dataset_duplicates": dd["cross_dataset"],
                     "kept": dd["kept"],
                     "sampled_images": bb["sampled_images"], "samples_per_epoch": bb["samples_per_epoch"],
                     "quarantine_reasons": d["quarantine_reasons"], "cell_types": d["cell_types"],
                     "ignored_files": d["ignored_files"]}
        p = per[name]
        if p["input_files"] != p["kept_files"] + p["quarantined_files"] or p["images"] != p["kept"] + p["duplicates"] \
                or p["sampled_images"] > p["kept"]:
            raise AssertionError(f"curation accounting broken for {name}: {p}")
    keys = ("input_files", "quarantined_files", "kept_files", "images", "cropped_cells", "duplicates",
            "exact_duplicates", "near_duplicates", "leakage", "cross_dataset_duplicates", "kept", "sampled_images",
            "samples_per_epoch", "ignored_files")
    total = {k: sum(p[k] for p in per.values()) for k in keys}
    if manifest_rows != total["sampled_images"]:
        raise AssertionError(f"manifest has {manifest_rows} rows, summary says {total['sampled_images']} sampled")
    summary = {"reconciliation": "input_files = kept_files + quarantined_files (files); "
                                 "images = kept + duplicates (exact, near, leakage; images incl. crops); "
                                 "manifest rows = sampled_images <= kept (unbalanced.parquet holds every kept image)",
               "datasets": per, "total": total,
               "stages": {k: {"seconds": v.get("seconds")} for k, v in results.items()},
               "embedder": results["embed"]["embedder"], "dedup_threshold": dedup["threshold"],
               # candidate pairs per kind: verified (removed), kept apart, no alignment, unverifiable (both kept)
               "dedup_verification": {k: {c: n for c, n in dedup["verification"][k].items()
                                          if not c.startswith("histogram")} for k in ("near", "leakage")},
               "leakage_threshold": dedup.get("leakage_threshold"), "eval_manifests": dedup.get("eval_manifests", []),
               "clusters": {"levels": results["cluster"]["levels"], "columns": results["cluster"]["columns"]},
               "balance": {k: bal[k] for k in ("enabled", "target_size", "samples_per_epoch", "sampled_images",
                                               "max_repeat", "seed", "groups_from", "top_cluster_column",
                                               "largest_share", "warnings")} | {
                   "before": {k: v for k, v in bal["before"].items() if k != "counts"},
                   "after": {k: v for k, v in bal["after"].items() if k != "counts"}}}
    storage.write_bytes(storage.join_uri(out_uri, "summary.json"), json.dumps(summary, indent=2).encode(),
                        storage_cfg)
    return summary


def publish_manifest(out_uri: str, source: str, storage_cfg) -> int:
    """Copy the run's ``source`` (a Parquet file or a directory of parts) to ``manifest.parquet`` in the same
    form, part by part; returns the rows written."""
    from cytoray import tables
    from cytoray.curation import shards

    src, dst = storage.join_uri(out_uri, source), storage.join_uri(out_uri, "manifest.parquet")
    shards.remove(dst, storage_cfg)
    if not tables._locate(src, storage_cfg)[2]:  # one file
        table = tables.read_table(src, storage_cfg)
        tables.write_table(dst, table, storage_cfg, sort=False)
        return table.num_rows
    rows = 0
    for i, f in enumerate(shards.layout(src, storage_cfg).files):
        protocol = storage.split_protocol(src)[0]
        table = tables.read_table(f if protocol == "file" else f"{protocol}://{f}", storage_cfg)
        shards.write_part(dst, i, table, storage_cfg)
        rows += table.num_rows
    return rows


def main(argv: list[str]) -> dict:
    files, overrides = config.split_cli(argv)
    cfg = config.load_config(CurateConfig, files[0] if files else None, files[1:], overrides)
    setup_logging(cfg.log_level)
    results = run_curation(cfg)
    out = cfg.output_uri
    console.say(f"outputs: {out}  (manifest.parquet; unbalanced, duplicates, quarantine .parquet; summary.json)")
    if "report" in results:
        console.say(f"report:  {storage.join_uri(out, 'report.html')}")
    log.debug(json.dumps(results, indent=2))
    return results
