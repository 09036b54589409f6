"""The curation run: config schema and the stage sequence behind ``recipes/curate.py``.

Stages write into one run directory (local or object storage) with a completion marker each
(``_stages/<stage>.json``), so a rerun skips what is finished:

ingest (``ingested.parquet``, ``quarantine.parquet``) -> embed (``embeddings.parquet``) -> dedup
(``deduplicated.parquet``, ``duplicates.parquet``) -> ``manifest.parquet`` (the curated manifest) and
``summary.json``, which reconciles per dataset: input files = kept files + quarantined files, and images
= kept + duplicates. Clustering and balancing append here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from cytoray import config, storage
from cytoray.curation.dedup import DedupConfig, run_dedup
from cytoray.curation.embed import EmbedConfig, run_embed
from cytoray.curation.ingest import DatasetSpec, IngestConfig, _write_table, run_ingest
from cytoray.runtime import RayConfig, init_ray, setup_logging

log = logging.getLogger(__name__)


@dataclass
class CurateConfig:
    output_uri: str = "???"  # run directory: local path or s3://bucket/prefix
    datasets: list[DatasetSpec] = field(default_factory=list)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    storage: storage.StorageConfig = field(default_factory=storage.StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    force: bool = False  # rerun stages even if their completion marker exists
    log_level: str = "INFO"


def run_curation(cfg: CurateConfig) -> dict:
    """Run every curation stage into ``cfg.output_uri``; returns {stage: summary}."""
    cfg = config.to_object(cfg)
    init_ray(cfg.ray)
    config.save_config(cfg, cfg.output_uri, cfg.storage)
    results = {"ingest": run_ingest(cfg.datasets, cfg.output_uri, cfg.ingest, cfg.storage, force=cfg.force)}
    force = cfg.force
    results["embed"] = run_embed(cfg.output_uri, cfg.embed, cfg.storage, force=force)
    results["dedup"] = run_dedup(cfg.output_uri, cfg.dedup, cfg.storage, force=force)
    results["summary"] = finalize(cfg.output_uri, results, cfg.storage)
    return results


def finalize(out_uri: str, results: dict, storage_cfg) -> dict:
    """Publish the last stage's rows as ``manifest.parquet``; write the reconciled ``summary.json``."""
    import io

    import pyarrow.parquet as pq

    fs, path = storage.filesystem(out_uri, storage_cfg)
    table = pq.read_table(io.BytesIO(fs.cat_file(f"{path}/deduplicated.parquet")))
    _write_table(fs, table, f"{path}/manifest.parquet", path)
    ingest, dedup = results["ingest"], results["dedup"]
    per = {}
    for name, d in ingest["datasets"].items():
        dd = dedup["datasets"].get(name, {"kept": 0, "duplicates": 0, "exact": 0, "near": 0, "cross_dataset": 0})
        per[name] = {"input_files": d["input_files"], "quarantined_files": d["quarantined_files"],
                     "kept_files": d["kept_files"], "images": d["kept_images"], "cropped_cells": d["cropped_cells"],
                     "duplicates": dd["duplicates"], "exact_duplicates": dd["exact"], "near_duplicates": dd["near"],
                     "cross_dataset_duplicates": dd["cross_dataset"], "kept": dd["kept"],
                     "quarantine_reasons": d["quarantine_reasons"], "cell_types": d["cell_types"],
                     "ignored_files": d["ignored_files"]}
        p = per[name]
        if p["input_files"] != p["kept_files"] + p["quarantined_files"] or p["images"] != p["kept"] + p["duplicates"]:
            raise AssertionError(f"curation accounting broken for {name}: {p}")
    keys = ("input_files", "quarantined_files", "kept_files", "images", "cropped_cells", "duplicates",
            "exact_duplicates", "near_duplicates", "cross_dataset_duplicates", "kept", "ignored_files")
    total = {k: sum(p[k] for p in per.values()) for k in keys}
    if table.num_rows != total["kept"]:
        raise AssertionError(f"manifest has {table.num_rows} rows, summary says {total['kept']} kept")
    summary = {"reconciliation": "input_files = kept_files + quarantined_files (files); "
                                 "images = kept + duplicates (images incl. crops)",
               "datasets": per, "total": total,
               "stages": {k: {"seconds": v.get("seconds")} for k, v in results.items()},
               "embedder": results["embed"]["embedder"], "dedup_threshold": dedup["threshold"]}
    storage.write_bytes(storage.join_uri(out_uri, "summary.json"), json.dumps(summary, indent=2).encode(),
                        storage_cfg)
    return summary


def main(argv: list[str]) -> dict:
    files, overrides = config.split_cli(argv)
    cfg = config.load_config(CurateConfig, files[0] if files else None, files[1:], overrides)
    setup_logging(cfg.log_level)
    results = run_curation(cfg)
    total = results["ingest"]["total"]
    print(f"ingest: {total['input_files']} files -> {total['kept_images']} images kept "
          f"({total['cropped_cells']} cropped cells), {total['quarantined_files']} quarantined, "
          f"{total['ignored_files']} outside layouts")
    t = results["summary"]["total"]
    print(f"dedup:  {t['images']} images -> {t['kept']} kept, {t['duplicates']} duplicates "
          f"({t['exact_duplicates']} exact, {t['near_duplicates']} near, {t['cross_dataset_duplicates']} across datasets)")
    print(f"manifest:   {storage.join_uri(cfg.output_uri, 'manifest.parquet')}")
    print(f"duplicates: {storage.join_uri(cfg.output_uri, 'duplicates.parquet')}")
    print(f"quarantine: {storage.join_uri(cfg.output_uri, 'quarantine.parquet')}")
    print(f"summary:    {storage.join_uri(cfg.output_uri, 'summary.json')}")
    log.debug(json.dumps(results, indent=2))
    return results
