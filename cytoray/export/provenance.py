"""What a run directory says about an exported backbone: its resolved config, the curated data behind its
manifest, its per-checkpoint probe table. Any piece may be missing; the model card then says so.

    <run>/config.yaml                 resolved PretrainConfig (recipes/pretrain.py)
    <run>/eval/results.csv            one row per step x manifest x method (eval.validation)
    <curation>/summary.json           per-dataset counts, dedup, balancing (curation.pipeline.finalize), where
                                      <curation> is the folder of the run's data.manifest_uri
    <curation>/config.yaml            the curation's datasets; one whose folder sits beside a
                                      ground_truth.parquet comes from cytoray's synthetic collection
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field

import yaml

from cytoray import storage
from cytoray.eval.validation import read_results_table

# <run>/checkpoint_<step> (Ray Train checkpoint) and <run>/exports/teacher_<step>.pth (training's exports)
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
TEACHER_EXPORT = re.compile(r"teacher_(\d+)\.pth")


@dataclass
class RunRecord:
    uri: str | None = None
    config: dict | None = None
    probe_rows: list[dict] = field(default_factory=list)
    curation_uri: str | None = None
    curation: dict | None = None  # the curation's summary.json
    synthetic_datasets: list[str] | None = None  # None: the curation's dataset list could not be read


def parent_uri(uri: str) -> str:
    protocol, path = storage.split_protocol(uri)
    parent = posixpath.dirname(path.rstrip("/"))
    return parent if protocol == "file" else f"{protocol}://{parent}"


def find_run(checkpoint_uri: str, storage_cfg: storage.StorageConfig | None = None) -> str | None:
    """The run directory of a checkpoint inside one (``<run>/checkpoint_<step>``, ``<run>/exports/teacher_<step>.pth``)
    when it holds a ``config.yaml``; None for any other file."""
    name = os.path.basename(checkpoint_uri.rstrip("/"))
    if CHECKPOINT_DIR.fullmatch(name):
        run = parent_uri(checkpoint_uri)
    elif TEACHER_EXPORT.fullmatch(name) and os.path.basename(parent_uri(checkpoint_uri)) == "exports":
        run = parent_uri(parent_uri(checkpoint_uri))
    else:
        return None
    return run if storage.exists(storage.join_uri(run, "config.yaml"), storage_cfg) else None


def read_yaml(uri: str, storage_cfg: storage.StorageConfig | None = None) -> dict | None:
    if not storage.exists(uri, storage_cfg):
        return None
    return yaml.safe_load(storage.read_bytes(uri, storage_cfg)) or {}


def read_run(run_uri: str | None, storage_cfg: storage.StorageConfig | None = None) -> RunRecord:
    """Everything the card reports about ``run_uri`` (None: an empty record)."""
    if run_uri is None:
        return RunRecord()
    record = RunRecord(uri=run_uri, config=read_yaml(storage.join_uri(run_uri, "config.yaml"), storage_cfg),
                       probe_rows=read_results_table(run_uri, storage_cfg))
    manifest = ((record.config or {}).get("data") or {}).get("manifest_uri")
    if not manifest or manifest == "???":
        return record
    record.curation_uri = parent_uri(manifest)
    summary = storage.join_uri(record.curation_uri, "summary.json")
    if storage.exists(summary, storage_cfg):
        record.curation = json.loads(storage.read_bytes(summary, storage_cfg))
    curate_cfg = read_yaml(storage.join_uri(record.curation_uri, "config.yaml"), storage_cfg)
    if curate_cfg is not None:
        record.synthetic_datasets = [
            d["name"] for d in curate_cfg.get("datasets") or []
            if storage.exists(storage.join_uri(parent_uri(d["uri"]), "ground_truth.parquet"), storage_cfg)]
    return record
