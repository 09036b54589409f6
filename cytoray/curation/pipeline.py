"""The curation run: config schema and the stage sequence behind ``recipes/curate.py``.

Stages write into one run directory (local or object storage) with a completion marker each, so a rerun
skips what is finished. This issue's stage is ``ingest``; embedding, deduplication, clustering and
balancing append to :func:`run_curation`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from cytoray import config, storage
from cytoray.curation.ingest import DatasetSpec, IngestConfig, run_ingest
from cytoray.runtime import RayConfig, init_ray, setup_logging

log = logging.getLogger(__name__)


@dataclass
class CurateConfig:
    output_uri: str = "???"  # run directory: local path or s3://bucket/prefix
    datasets: list[DatasetSpec] = field(default_factory=list)
    ingest: IngestConfig = field(default_factory=IngestConfig)
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
    return results


def main(argv: list[str]) -> dict:
    files, overrides = config.split_cli(argv)
    cfg = config.load_config(CurateConfig, files[0] if files else None, files[1:], overrides)
    setup_logging(cfg.log_level)
    results = run_curation(cfg)
    total = results["ingest"]["total"]
    print(f"ingest: {total['input_files']} files -> {total['kept_images']} images kept "
          f"({total['cropped_cells']} cropped cells), {total['quarantined_files']} quarantined, "
          f"{total['ignored_files']} outside layouts")
    print(f"manifest:   {storage.join_uri(cfg.output_uri, 'manifest.parquet')}")
    print(f"quarantine: {storage.join_uri(cfg.output_uri, 'quarantine.parquet')}")
    print(f"summary:    {storage.join_uri(cfg.output_uri, 'summary.json')}")
    log.debug(json.dumps(results, indent=2))
    return results
