"""What a run directory says about an exported backbone: its resolved config, the curated data behind its
manifest, its per-checkpoint probe table. Any piece may be missing; the model card then says so. And how the
card names those files (:class:`CardPaths`, ``export.card_paths``): a card is published as it is, so by default
it names no path of the machine that trained; the full paths go to ``provenance.json`` beside the format
folders, which stays local.

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
from cytoray.config import ConfigError
from cytoray.eval.validation import read_results_table

# <run>/checkpoint_<step> (Ray Train checkpoint) and <run>/exports/teacher_<step>.pth (training's exports)
CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)")
TEACHER_EXPORT = re.compile(r"teacher_(\d+)\.pth")
CARD_PATHS = ("relative", "full", "none")
PROVENANCE_FILE = "provenance.json"  # beside the format folders, never inside one: not uploaded with a format
MAX_UP = 2  # relative: a local path at most this many levels above the run ("../../x"); others by file name


@dataclass
class ExportConfig:
    """How an export's model cards name the files behind the model (docs/export.md, "The model card")."""

    # relative: local paths relative to the run directory (file name alone when more than MAX_UP levels above
    # it), object-storage URIs as configured; full: every path as given; none: no paths. provenance.json beside
    # the export keeps the full ones whatever the choice.
    card_paths: str = "relative"


def check_card_paths(style: str) -> str:
    if style not in CARD_PATHS:
        raise ConfigError(f"export.card_paths={style!r}: choose one of {', '.join(CARD_PATHS)} (relative: paths "
                          "relative to the run, for cards published as they are)")
    return style


class CardPaths:
    """How a card writes the path ``uri`` (None: the card names no path) under ``style`` for the run ``run_uri``."""

    def __init__(self, style: str, run_uri: str | None):
        self.style, self.run_uri = check_card_paths(style), run_uri

    def __call__(self, uri: str | None) -> str | None:
        if uri is None or self.style == "none":
            return None
        protocol, path = storage.split_protocol(uri)
        if self.style == "full" or protocol != "file":  # an object-storage URI names no machine
            return uri
        run = storage.split_protocol(self.run_uri) if self.run_uri else None
        if run and run[0] == "file":
            rel = os.path.relpath(path, run[1])
            if rel.split(os.sep)[:MAX_UP + 1].count(os.pardir) <= MAX_UP:
                return rel
        return os.path.basename(path.rstrip("/"))

    def run(self) -> str | None:
        """The run directory as the card names it (relative: its folder name)."""
        if self.run_uri is None or self.style == "full":
            return self.run_uri
        return None if self.style == "none" else os.path.basename(self.run_uri.rstrip("/"))


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


def provenance(checkpoint: str, meta: dict, run: RunRecord, folders: dict[str, str], card_paths: str) -> dict:
    """The export's full provenance for ``provenance.json``: every path in full (local ones absolute)."""
    def full(uri):
        if uri is None:
            return None
        protocol, path = storage.split_protocol(uri)
        return path if protocol == "file" else uri

    c = run.config or {}
    return {"note": "local provenance of this export, with full paths; not part of any format folder, not meant "
                    "for publishing",
            "checkpoint": full(checkpoint), "step": meta.get("step"), "run": full(run.uri),
            "training_manifest": full((c.get("data") or {}).get("manifest_uri")),
            "init_checkpoint": full((c.get("train") or {}).get("init_checkpoint")),
            "curation": full(run.curation_uri),
            "eval_manifests": [full(u) for u in (run.curation or {}).get("eval_manifests") or []],
            "formats": {fmt: full(uri) for fmt, uri in folders.items()}, "card_paths": card_paths}
