"""Every checkpoint scored while training runs: Ray Train V2's per-checkpoint validation.

The training loop reports each sharded checkpoint with ``validation=True`` (every ``eval.every``-th, and the last
one); Ray Train's controller then runs :class:`CheckpointScorer` as a separate Ray task (``eval.probe.num_cpus`` /
``num_gpus``) while the workers go on training. The task reads only the EMA teacher's tensors from the
checkpoint (``models.checkpoints.load_training_checkpoint``), runs the probe of ``cytoray.eval.probe`` on
every ``eval.manifests`` entry, and

- returns flat metrics that Ray Train merges into the checkpoint's metrics: ``probe_score`` (mean linear-probe
  balanced accuracy over the manifests, in-site or, with ``eval.probe.headline=cross_site``, the mean over
  held-out sites; ABMIL's for a patient-only manifest), ``probe/<manifest>/<method>/<metric>``,
  ``probe/<manifest>/cross_site/<method>/<metric>`` and ``probe/<manifest>/robustness_index`` where computed —
  ``eval.keep_best`` keeps the best checkpoints by ``probe_score`` (so do Tune sweeps);
- writes ``<run>/eval/checkpoint_<step>.json`` (everything, per-class recall and confusion included) and
  rewrites ``<run>/eval/results.csv`` (one row per step x manifest x method), the run's results table.

Ray Train runs one validation at a time and waits for queued ones before ``fit()`` returns, so the table is
complete when the run ends. A failed or timed-out validation is logged and marks only that checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field

from cytoray import storage
from cytoray.config import location_field
from cytoray.eval.methods import HEADLINE
from cytoray.eval.metrics import ProbeError
from cytoray.eval.probe import ProbeConfig, evaluate, read_labelled_manifest
from cytoray.eval.protocols import check_settings

log = logging.getLogger(__name__)

EVAL_DIR = "eval"
RESULTS_CSV = "results.csv"
SCORE = "probe_score"
CROSS_SITE = "cross_site/"  # results.csv method prefix: cross_site/<method> (mean), cross_site/<method>/<site>
# what the printed tables show (results.csv has every method and held-out site)
SHOWN_METHODS = (HEADLINE, "knn20", "abmil", f"{CROSS_SITE}{HEADLINE}", f"{CROSS_SITE}knn20", f"{CROSS_SITE}abmil")
CSV_FIELDS = ["step", "checkpoint", "manifest", "method", "images", "accuracy", "balanced_accuracy", "weighted_f1"]


@dataclass
class EvalConfig:
    manifests: list[str] = location_field(default_factory=list)  # labelled manifests scored per checkpoint; []: off
    every: int = 1  # score every N-th checkpoint (and always the last)
    # The probe's settings, overridable as eval.probe.<field>. Three defaults differ from recipes/probe.py's
    # because scoring runs as one Ray task beside the training workers: features in that task (num_actors=0,
    # no nested actor pool), a quarter CPU for it (fits beside the workers on small clusters), shorter ABMIL.
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(num_actors=0, num_cpus=0.25, mil_epochs=30))
    timeout_s: float | None = None  # a validation running longer is cancelled (the checkpoint is kept)
    keep_best: bool = False  # keep train.keep_checkpoints best by probe_score (+ the latest) instead of newest


def manifest_names(manifests: list[str]) -> list[str]:
    """Short unique names: file stem, or the folder for ``.../<name>/manifest.parquet``."""
    names = []
    for uri in manifests:
        stem = os.path.splitext(os.path.basename(uri.rstrip("/")))[0]
        name = os.path.basename(os.path.dirname(uri.rstrip("/"))) if stem == "manifest" else stem
        name = name or stem
        names.append(name if name not in names else f"{name}{len(names)}")
    return names


METRICS = ("accuracy", "balanced_accuracy", "weighted_f1")


def cross_site_parts(r: dict) -> list[tuple[str, dict]]:
    """(method, cross-site result with ``mean`` and ``per_site``) of one probe result: cell methods, then ABMIL."""
    parts = list(r.get("cross_site", {}).get("methods", {}).items())
    return parts + ([("abmil", r["mil"]["cross_site"])] if "cross_site" in r.get("mil", {}) else [])


def headline_score(r: dict, headline: str = "in_site") -> float | None:
    """One manifest's part of probe_score: the linear probe's balanced accuracy (in-site, or the mean over held-out
    sites with headline ``cross_site``); ABMIL's for a manifest without cell labels; None when it has neither."""
    if headline == "cross_site":
        parts = dict(cross_site_parts(r))
        m = parts.get(HEADLINE) or parts.get("abmil")
        return None if m is None else m["mean"]["balanced_accuracy"]
    if HEADLINE in r["methods"]:
        return r["methods"][HEADLINE]["balanced_accuracy"]
    return r["mil"]["balanced_accuracy"] if "mil" in r else None


def flat_metrics(results: list[dict], names: list[str], headline: str = "in_site") -> dict[str, float]:
    """Ray Train checkpoint metrics from probe results (numbers only); ``probe_score`` by ``headline``."""
    out: dict[str, float] = {}
    scores = []
    for name, r in zip(names, results):
        for method, m in r["methods"].items():
            for key in METRICS:
                out[f"probe/{name}/{method}/{key}"] = m[key]
        if "mil" in r:
            for key in METRICS:
                out[f"probe/{name}/abmil/{key}"] = r["mil"][key]
        for method, m in cross_site_parts(r):
            for key in METRICS:
                out[f"probe/{name}/{CROSS_SITE}{method}/{key}"] = m["mean"][key]
        if "robustness" in r:
            for key in ("robustness_index", "biology_share"):
                if r["robustness"][key] is not None:  # None: undefined ratio (protocols.robustness_index)
                    out[f"probe/{name}/{key}"] = r["robustness"][key]
        score = headline_score(r, headline)
        if score is not None:
            scores.append(score)
    out[SCORE] = float(sum(scores) / len(scores)) if scores else math.nan
    return out


def table_rows(step: int, checkpoint: str, results: list[dict], names: list[str]) -> list[dict]:
    """results.csv rows: one per manifest x method (in-site), and per cross-site method its mean over the held-out
    sites (``cross_site/<method>``) and each held-out site (``cross_site/<method>/<site>``)."""
    rows = []

    def row(name, method, images, m):
        rows.append({"step": step, "checkpoint": checkpoint, "manifest": name, "method": method, "images": images,
                     **{k: round(m[k], 6) for k in METRICS}})

    for name, r in zip(names, results):
        parts = list(r["methods"].items()) + ([("abmil", r["mil"])] if "mil" in r else [])
        for method, m in parts:
            row(name, method, m.get("patients", r["images"]) if method == "abmil" else r["images"], m)
        for method, m in cross_site_parts(r):
            count = {s: x.get("patients", r.get("cross_site", {}).get("images", {}).get(s))
                     for s, x in m["per_site"].items()}
            row(name, f"{CROSS_SITE}{method}", sum(v or 0 for v in count.values()), m["mean"])
            for site, x in m["per_site"].items():
                row(name, f"{CROSS_SITE}{method}/{site}", count[site], x)
    return rows


def write_results_table(run: str, storage_cfg=None) -> str:
    """(Re)build ``<run>/eval/results.csv`` from every ``<run>/eval/checkpoint_*.json``; returns its URI."""
    fs, path = storage.filesystem(storage.join_uri(run, EVAL_DIR), storage_cfg)
    files = sorted(p for p in storage.with_retries(lambda: fs.ls(path, detail=False), storage_cfg, "list eval")
                   if os.path.basename(p).startswith("checkpoint_") and p.endswith(".json"))
    rows = []
    for p in files:
        rows.extend(json.loads(storage.with_retries(lambda p=p: fs.cat_file(p), storage_cfg, "read eval"))["rows"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(sorted(rows, key=lambda r: (r["step"], r["manifest"], r["method"])))
    uri = storage.join_uri(run, EVAL_DIR, RESULTS_CSV)
    storage.write_bytes(uri, buf.getvalue().encode(), storage_cfg)
    return uri


def read_results_table(run: str, storage_cfg=None) -> list[dict]:
    uri = storage.join_uri(run, EVAL_DIR, RESULTS_CSV)
    if not storage.exists(uri, storage_cfg):
        return []
    return list(csv.DictReader(io.StringIO(storage.read_bytes(uri, storage_cfg).decode())))


def read_robustness(run: str, storage_cfg=None) -> list[dict]:
    """The Robustness Index of every scored checkpoint (from ``<run>/eval/checkpoint_*.json``): rows of step,
    manifest, k, robustness_index, biology_share (None where undefined); [] when none was computed."""
    fs, path = storage.filesystem(storage.join_uri(run, EVAL_DIR), storage_cfg)
    if not storage.exists(storage.join_uri(run, EVAL_DIR), storage_cfg):
        return []
    files = sorted(p for p in storage.with_retries(lambda: fs.ls(path, detail=False), storage_cfg, "list eval")
                   if os.path.basename(p).startswith("checkpoint_") and p.endswith(".json"))
    out = []
    for p in files:
        record = json.loads(storage.with_retries(lambda p=p: fs.cat_file(p), storage_cfg, "read eval"))
        for name, r in zip(record.get("manifests", {}), record.get("results", [])):
            if "robustness" in r:
                v = r["robustness"]
                out.append({"step": record["step"], "manifest": name, "k": v["k"],
                            "robustness_index": v["robustness_index"], "biology_share": v["biology_share"]})
    return out


def format_results_table(rows: list[dict], methods=None) -> str:
    """Balanced accuracy per step (rows) and manifest/method (columns); ``methods`` default: SHOWN_METHODS."""
    methods = SHOWN_METHODS if methods is None else methods
    cols = sorted({(r["manifest"], r["method"]) for r in rows if r["method"] in methods})
    steps = sorted({int(r["step"]) for r in rows})
    val = {(int(r["step"]), r["manifest"], r["method"]): float(r["balanced_accuracy"]) for r in rows}
    head = f"{'step':>8s} " + " ".join(f"{(m + ':' + k)[-22:]:>22s}" for m, k in cols)
    lines = [head, "-" * len(head)]
    for s in steps:
        lines.append(f"{s:8d} " + " ".join(f"{val.get((s, m, k), math.nan):22.3f}" for m, k in cols))
    return "\n".join(lines)


class CheckpointScorer:
    """Ray Train ``ValidationConfig.fn``: probe a reported checkpoint, record and return the scores."""

    def __init__(self, cfg: EvalConfig, run: str, storage_cfg=None):
        self.cfg, self.run, self.storage_cfg = cfg, run, storage_cfg

    def __call__(self, checkpoint, **_) -> dict:
        from cytoray.platform.models.checkpoints import TRAIN_STATE

        uri = storage.join_uri(self.run, os.path.basename(checkpoint.path.rstrip("/")))
        state = json.loads(storage.read_bytes(storage.join_uri(uri, TRAIN_STATE), self.storage_cfg))
        step = int(state["step"])
        names = manifest_names(self.cfg.manifests)
        results = evaluate(uri, list(self.cfg.manifests), self.cfg.probe, self.storage_cfg)
        rows = table_rows(step, uri, results, names)
        record = {"step": step, "checkpoint": uri, "manifests": dict(zip(names, self.cfg.manifests)),
                  "rows": rows, "results": results}
        storage.write_bytes(storage.join_uri(self.run, EVAL_DIR, f"checkpoint_{step:08d}.json"),
                            json.dumps(record, indent=1).encode(), self.storage_cfg)
        write_results_table(self.run, self.storage_cfg)
        out = flat_metrics(results, names, self.cfg.probe.headline)
        out["probe_step"] = step
        shown = ", ".join(f"{r['manifest']} {r['method']} {r['balanced_accuracy']:.3f}" for r in rows
                          if r["method"] in SHOWN_METHODS)
        print(f"[cytoray] probe of step {step} (balanced accuracy): {shown}", flush=True)
        return out


def validation_config(cfg: EvalConfig, run: str, storage_cfg=None):
    """Ray Train's ``ValidationConfig`` for the run, or None when ``eval.manifests`` is empty."""
    if not cfg.manifests:
        return None
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig

    p = cfg.probe
    # DEFAULT: not inside a placement group the caller may run in (a Tune trial's bundle would capture it)
    remote = {"num_cpus": p.num_cpus, "scheduling_strategy": "DEFAULT", **({"num_gpus": p.num_gpus} if p.num_gpus else {})}
    return ValidationConfig(fn=CheckpointScorer(cfg, run, storage_cfg),
                            task_config=ValidationTaskConfig(timeout_s=cfg.timeout_s), ray_remote_kwargs=remote)


def check(cfg: EvalConfig, storage_cfg=None) -> None:
    """Fail at start-up, naming the manifest, rather than in every validation task."""
    from cytoray.config import ConfigError

    if cfg.every < 1:
        raise ConfigError("eval.every must be >= 1 (score every N-th checkpoint)")
    check_settings_for_training(cfg.probe)
    for uri in cfg.manifests:
        try:
            read_labelled_manifest(uri, cfg.probe, storage_cfg)  # with cross_site: every named site present
        except ProbeError as exc:
            raise ConfigError(f"eval.manifests: {exc}") from None


def check_settings_for_training(probe_cfg: ProbeConfig) -> None:
    """The probe's settings that need no manifest (headline, cross-site protocol), named as ``eval.probe.*``;
    a training run and a sweep call it before launching anything."""
    from cytoray.config import ConfigError

    try:
        check_settings(probe_cfg.cross_site, probe_cfg.headline)
    except ProbeError as exc:
        raise ConfigError(str(exc).replace("probe.", "eval.probe.")) from None
