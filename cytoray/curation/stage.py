"""The one way a curation stage runs: marker, settings, lineage, staging, atomic publish, timing.

Stages form a chain (:data:`STAGES`); each reads its predecessors' outputs in the run directory and publishes
its own. :func:`run_stage` owns everything around a stage's algorithm:

- **Marker** ``_stages/<stage>.json``: the stage's summary plus ``settings`` (plain JSON), ``lineage`` (a hash of
  the stage name, its output format (:data:`FORMATS`), its settings and its predecessor's lineage) and ``seconds``. A stage is done when its marker
  exists and its lineage equals what the current settings and the predecessor's current marker give. So a
  changed setting reruns that stage, and — because the lineage changes — every later stage the next time it is
  asked to run, whoever calls it (the pipeline, a recipe, or ``run_cluster`` directly).
- **No half-written state counts as done**: the marker is removed before the body runs and written after every
  output is published; outputs are published one by one atomically (``tables.write_table`` /
  ``storage.write_bytes``: temp name + rename locally, one PUT on object storage).
- **Staging**: :attr:`StageRun.staging` is a private directory for intermediate files (e.g. Ray Data's
  partitioned writes), removed when the stage ends, failed or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, is_dataclass

from cytoray import storage, tables
from cytoray.errors import UserError

log = logging.getLogger(__name__)

STAGES = ("ingest", "embed", "dedup", "cluster", "balance")
# What a stage's outputs hold, by version: bumped when code changes the columns or their meaning, so that a run
# directory written by older code reruns that stage (and, through the lineage, every later one) instead of
# failing on a missing column or mixing outputs of two designs. Stages not named are at their first format.
FORMATS = {
    "embed": "copy-detection fingerprints (2 views: nucleus-sized canonical, frame; frames, 96 px verify, image size)",
    "dedup": "verified copies (score, transform)",
    "balance": "largest shares before/after (grouping, datasets, labelled cell types), warnings; enabled=false: "
               "every kept image once",
}
MARKER_DIR = "_stages"
RESERVED = ("settings", "lineage", "seconds")


class StageOrderError(UserError):
    """A stage asked to run before the stage whose output it reads."""


def plain(obj):
    """Settings as plain JSON data (dataclasses, dicts, lists, tuples), keys sorted."""
    def walk(o):
        if is_dataclass(o):
            return walk(asdict(o))
        if isinstance(o, dict):
            return {str(k): walk(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v) for v in o]
        return o

    return json.loads(json.dumps(walk(obj), sort_keys=True))


def marker_uri(out_uri: str, stage: str) -> str:
    return storage.join_uri(out_uri, MARKER_DIR, f"{stage}.json")


def read_marker(out_uri: str, stage: str, storage_cfg=None) -> dict | None:
    uri = marker_uri(out_uri, stage)
    return json.loads(storage.read_bytes(uri, storage_cfg)) if storage.exists(uri, storage_cfg) else None


def lineage(stage: str, settings, upstream: str | None) -> str:
    key = [stage, plain(settings), upstream] + ([FORMATS[stage]] if stage in FORMATS else [])
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


class StageRun:
    """What a stage body gets: where to read and publish, and a private staging directory."""

    def __init__(self, stage: str, out_uri: str, storage_cfg=None):
        self.stage, self.out_uri, self.storage_cfg = stage, out_uri, storage_cfg
        self.staging = storage.join_uri(out_uri, "_staging", f"{stage}-{uuid.uuid4().hex[:8]}")

    def uri(self, name: str) -> str:
        return storage.join_uri(self.out_uri, name)

    def read(self, name: str, columns: list[str] | None = None):
        return tables.read_table(self.uri(name), self.storage_cfg, columns)

    def publish(self, name: str, table, sort: bool = True) -> None:
        tables.write_table(self.uri(name), table, self.storage_cfg, sort)

    def publish_bytes(self, name: str, data: bytes) -> None:
        storage.write_bytes(self.uri(name), data, self.storage_cfg)

    def cleanup(self) -> None:
        from cytoray.curation.shards import remove

        remove(self.staging, self.storage_cfg)


def run_stage(stage: str, out_uri: str, settings, body: Callable[[StageRun], dict], storage_cfg=None,
              force: bool = False) -> dict:
    """Run ``body`` as stage ``stage`` of the run in ``out_uri`` unless its marker is current (see module doc);
    returns the stage summary (the marker's content)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    position = STAGES.index(stage)
    upstream = None
    if position:
        before = STAGES[position - 1]
        prev = read_marker(out_uri, before, storage_cfg)
        if prev is None or "lineage" not in prev:
            raise StageOrderError(f"{stage} reads the output of {before}, which has not completed in {out_uri}; "
                                  f"run the stages in order ({' -> '.join(STAGES)}), e.g. recipes/curate.py")
        upstream = prev["lineage"]
    want = lineage(stage, settings, upstream)
    done = read_marker(out_uri, stage, storage_cfg)
    if not force and done is not None and done.get("lineage") == want:
        log.info("%s: up to date in %s; skipping", stage, out_uri)
        return done
    if done is not None and not force:
        log.info("%s: settings or earlier stages changed since the last run; rerunning", stage)
    marker = marker_uri(out_uri, stage)
    if done is not None:  # from here on the old outputs may be half replaced: never let them count as done
        fs, path = storage.filesystem(marker, storage_cfg)
        storage.with_retries(lambda: fs.rm(path), storage_cfg, f"remove {marker}")
    run = StageRun(stage, out_uri, storage_cfg)
    t0 = time.time()
    try:
        summary = body(run)
    finally:
        run.cleanup()
    clash = [k for k in RESERVED if k in summary]
    if clash:
        raise AssertionError(f"stage {stage} returned reserved summary keys {clash}")
    summary = {**summary, "settings": plain(settings), "lineage": want, "seconds": round(time.time() - t0, 2)}
    storage.write_bytes(marker, json.dumps(summary).encode(), storage_cfg)
    log.info("%s: done in %.1fs", stage, summary["seconds"])
    return summary
