"""Ray Tune sweeps of augmentation settings, each trial a short pretraining run scored by the probe.

A trial is a Tune *function trainable* that runs the Ray Train pretraining job (``train.pretrain``) in rungs:
train to ``sweep.rungs[0]`` steps, then to ``rungs[1]`` (resuming its own checkpoint), ... After each rung the
checkpoint's probe score (the per-checkpoint validation task of ``validation.py``, on ``eval.manifests``) is
reported to Tune with ``tune.report``; ASHA (time attribute ``step``, metric ``probe_score``) stops weak trials
at rung boundaries. ``eval.probe.headline`` says what ``probe_score`` is: the in-site linear probe (default) or,
with ``cross_site`` and ``eval.probe.cross_site.protocol`` set, its mean over held-out sites — what stain
augmentations are for. Ray Train's ``TuneReportCallback`` streams the training metrics (loss, lr, img/s) into the
trial's results too (those lack ``probe_score``, which ASHA ignores; strict metric checking is off for them).

Knobs (``sweep.knobs`` picks them, ``sweep.space``: knob -> list of values) are named augmentation settings, each expanding to
``model.augment.*`` keys (:data:`KNOBS`); ``best_overrides.yaml`` holds the best trial's keys, ready for
``recipes/pretrain_*.py --config best_overrides.yaml``.

Resources: a trial needs ``sweep.trial_cpus`` + ``num_workers × (cpus_per_worker + data.num_actors ×
data.num_cpus)`` + ``eval.probe.num_cpus``; concurrency is capped so that running trials fit the cluster
(pending trials wait instead of deadlocking half-started jobs), and a trial that cannot fit at all is refused up
front. Ray Train removes its placement group when each ``fit()`` returns; trials stopped by ASHA take theirs
down with them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from cytoray import config as config_lib
from cytoray import console, storage
from cytoray.platform.config import PretrainConfig


def _jitter(j: float) -> dict:
    """DINOv2's colour jitter (0.4, 0.4, 0.2, 0.1 with p=0.8) scaled by ``j``; 0 turns it off."""
    return {"model.augment.jitter_p": 0.8 if j > 0 else 0.0, "model.augment.brightness": 0.4 * j,
            "model.augment.contrast": 0.4 * j, "model.augment.saturation": 0.2 * j, "model.augment.hue": 0.1 * j}


def _stain(s: float) -> dict:
    """HED stain jitter of strength ``s`` (σ) on half the crops; 0 turns it off."""
    return {"model.augment.hed_p": 0.5 if s > 0 else 0.0, "model.augment.hed_sigma": float(s) if s > 0 else 0.05}


FLIPS = {"none": (0.0, 0.0, False), "hflip": (0.5, 0.0, False), "flip": (0.5, 0.5, False),
         "flip_rot90": (0.5, 0.5, True)}


def _flips(name: str) -> dict:
    if name not in FLIPS:
        raise config_lib.ConfigError(f"sweep.space.rotation_flip value {name!r}: choose from {sorted(FLIPS)}")
    h, v, r = FLIPS[name]
    return {"model.augment.hflip_p": h, "model.augment.vflip_p": v, "model.augment.rot90": r}


# knob -> (description, value -> {dotted config key: value})
KNOBS = {
    "global_crop_scale": ("lower bound of the global crops' area scale (upper 1.0)",
                          lambda s: {"model.augment.global_crops.scale": [float(s), 1.0]}),
    "local_crop_scale": ("upper bound of the local crops' area scale (lower 0.05)",
                         lambda s: {"model.augment.local_crops.scale": [0.05, float(s)]}),
    "jitter_strength": ("colour jitter strength (x DINOv2's; 0 = off)", _jitter),
    "stain": ("HED stain augmentation strength sigma (0 = off)", _stain),
    "local_crops": ("number of local crops", lambda n: {"model.augment.local_crops.number": int(n)}),
    "rotation_flip": (f"flips / 90° rotations: {' | '.join(FLIPS)}", _flips),
    "reinhard": ("Reinhard colour transfer probability", lambda p: {"model.augment.reinhard_p": float(p)}),
}


@dataclass
class SweepConfig:
    # which knobs are swept (a list, so a config file or key=value replaces it), and each knob's values
    knobs: list[str] = field(default_factory=lambda: ["global_crop_scale", "jitter_strength", "stain",
                                                      "local_crops", "rotation_flip"])
    space: dict[str, Any] = field(default_factory=lambda: {
        "global_crop_scale": [0.32, 0.5], "local_crop_scale": [0.32, 0.5], "jitter_strength": [0.5, 1.0],
        "stain": [0.0, 0.05], "local_crops": [4, 8], "rotation_flip": ["flip", "flip_rot90"],
        "reinhard": [0.0, 0.2]})
    search: str = "random"  # random: num_samples draws | grid: every combination, num_samples times
    num_samples: int = 8
    rungs: list[int] = field(default_factory=lambda: [500, 1000, 2000])  # steps at which trials are probed
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs (and GPUs) fit
    trial_cpus: float = 0.05  # the function trainable itself (the training job brings its own workers)
    name: str = "sweep"
    storage_path: str = config_lib.location_field("runs")  # the sweep dir: <storage_path>/<name>/{trials/, results.csv, scores.png, ...}
    seed: int = 0


@dataclass
class SweepRunConfig(PretrainConfig):
    """A pretraining config (the base every trial starts from) plus the sweep."""

    sweep: SweepConfig = field(default_factory=SweepConfig)


def knob_overrides(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for knob, v in values.items():
        if knob not in KNOBS:
            raise config_lib.ConfigError(f"sweep.space: unknown knob {knob!r}; choose from {sorted(KNOBS)}")
        out.update(KNOBS[knob][1](v))
    return out


def apply_overrides(cfg, dotted: dict[str, Any]):
    """Set dotted keys on a config dataclass (a copy), type-checked by the schema."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(cfg)
    for key, value in dotted.items():
        OmegaConf.update(base, key, value, merge=False)
    return config_lib.to_object(base)


def nested(dotted: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return out


def trial_demand(cfg: SweepRunConfig) -> dict[str, float]:
    t, d = cfg.train, cfg.data
    cpu = cfg.sweep.trial_cpus + t.num_workers * (t.cpus_per_worker + d.num_actors * d.num_cpus) \
        + cfg.eval.probe.num_cpus
    return {"CPU": cpu, "GPU": (t.num_workers if t.use_gpu else 0) + cfg.eval.probe.num_gpus}


def check(cfg: SweepRunConfig, cluster: dict[str, float]) -> int:
    """Validate the sweep against the cluster; returns the number of trials that may run at once."""
    from cytoray.eval import validation

    cfg = config_lib.to_object(cfg)
    s = cfg.sweep
    if not cfg.eval.manifests:
        raise config_lib.ConfigError("the sweep scores trials with the probe: set eval.manifests=[<labelled "
                                     "manifest>, ...] (held out of pretraining)")
    validation.check_settings_for_training(cfg.eval.probe)  # probe_score's headline (in_site | cross_site)
    if not s.knobs:
        raise config_lib.ConfigError("sweep.knobs is empty: name at least one knob, e.g. sweep.knobs=[stain]")
    for knob in s.knobs:
        if knob not in KNOBS:
            raise config_lib.ConfigError(f"sweep.knobs: unknown knob {knob!r}; choose from {sorted(KNOBS)}")
        values = s.space.get(knob)
        if not isinstance(values, (list, tuple)) or not values:
            raise config_lib.ConfigError(f"sweep.space.{knob} must be a non-empty list of values")
        for v in values:
            apply_overrides(cfg, knob_overrides({knob: v}))  # unknown knobs / wrong types fail here
    if not s.rungs or any(b <= a for a, b in zip(s.rungs, s.rungs[1:])) or s.rungs[0] < 1:
        raise config_lib.ConfigError(f"sweep.rungs={list(s.rungs)} must be increasing step counts >= 1")
    if s.rungs[-1] > cfg.model.total_iters:
        raise config_lib.ConfigError(f"sweep.rungs ends at {s.rungs[-1]} > model.total_iters="
                                     f"{cfg.model.total_iters}; raise model.total_iters (schedules span it)")
    if cfg.train.schedule_to_max_steps:
        raise config_lib.ConfigError("train.schedule_to_max_steps=true would give each rung of a trial other "
                                     "schedules; set it to false and model.total_iters to the sweep's length")
    if s.search not in ("random", "grid"):
        raise config_lib.ConfigError(f"sweep.search={s.search!r}: choose random or grid")
    need = trial_demand(cfg)
    fits = []
    for res, amount in need.items():
        if amount > 0:
            have = cluster.get(res, 0.0)
            if amount > have + 1e-9:
                raise config_lib.ConfigError(
                    f"one trial needs {amount:g} {res} (sweep.trial_cpus + train.num_workers x (train.cpus_per_worker"
                    f" + data.num_actors x data.num_cpus) + eval.probe.num_cpus) but the cluster has {have:g}; "
                    "lower those settings or add nodes")
            fits.append(int(math.floor(have / amount + 1e-9)))
    most = max(1, min(fits))
    return min(most, s.max_concurrent) if s.max_concurrent > 0 else most


def sweep_uri(cfg: SweepRunConfig) -> str:
    return storage.join_uri(cfg.sweep.storage_path, cfg.sweep.name)


def run_trial(config: dict, base: SweepRunConfig) -> None:
    """The Tune function trainable: one short pretraining run in rungs, probe score reported after each."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cytoray.eval import validation
    from cytoray.platform.train import pretrain

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_overrides(base, knob_overrides(config))
    cfg.run.storage_path = storage.join_uri(sweep_uri(base), "trials")
    cfg.run.name = f"trial_{trial_id}"
    cfg.train.final_export = []  # trials are scored by the probe; the sweep's winner is retrained or exported
    for rung, steps in enumerate(cfg.sweep.rungs):
        cfg.train.max_steps = steps  # the last step always checkpoints and is probed
        result = pretrain(cfg, callbacks=[TuneReportCallback()])
        if result.error is not None:
            raise result.error
        scored = [m for _, m in (result.best_checkpoints or []) if m.get("probe_step") == steps]
        if not scored:
            raise RuntimeError(f"trial {trial_id}: the checkpoint of step {steps} was not probed (validation failed "
                               "or timed out; see the run's logs)")
        m = scored[-1]
        ray.tune.report({"step": steps, "rung": rung, validation.SCORE: m[validation.SCORE],
                         **{k: v for k, v in m.items() if k.startswith("probe/")}})


def _space(cfg: SweepRunConfig) -> dict:
    from ray import tune

    make = tune.grid_search if cfg.sweep.search == "grid" else tune.choice
    return {knob: make(list(cfg.sweep.space[knob])) for knob in cfg.sweep.knobs}


def make_tuner(trainable, space: dict, s: SweepConfig, concurrent: int, storage_path: str, fs=None):
    """The Tuner of a sweep: ASHA on the probe score over ``s.rungs``, at most ``concurrent`` trials at once.

    The cap goes to the search algorithm: Tune ignores ``TuneConfig.max_concurrent_trials`` when it is handed
    a ready-made ``BasicVariantGenerator`` (a warning, then every grid point starts at once -- on a small
    cluster the trials' training jobs then wait on each other's CPUs)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cytoray.eval import validation

    scheduler = ASHAScheduler(time_attr="step", max_t=s.rungs[-1], grace_period=s.rungs[0],
                              reduction_factor=s.reduction_factor)
    search = tune.search.BasicVariantGenerator(random_state=s.seed, max_concurrent=concurrent)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=validation.SCORE, mode="max", scheduler=scheduler,
                                    num_samples=s.num_samples, search_alg=search),
        run_config=tune.RunConfig(name=s.name, storage_path=storage_path, storage_filesystem=fs))


def run_sweep(cfg: SweepRunConfig) -> dict:
    """Run the sweep; write results.csv, scores.png, best_overrides.yaml, best.json; returns a summary."""
    import ray
    from ray import tune

    from cytoray.eval import validation
    from cytoray.runtime import environment, init_ray

    cfg = config_lib.to_object(cfg)
    # eval.manifests read with the probe's settings (columns, cross-site sites) before Ray starts, not per trial
    validation.check(cfg.eval, cfg.storage)
    init_ray(cfg.ray)
    concurrent = check(cfg, ray.cluster_resources())
    s = cfg.sweep
    out = sweep_uri(cfg)
    protocol, path = storage.split_protocol(s.storage_path)
    if protocol == "file":
        tune_storage, fs = os.path.abspath(path), None
        s.storage_path = os.path.abspath(path)
        out = sweep_uri(cfg)
    else:
        fs, tune_storage = storage.arrow_filesystem(s.storage_path, cfg.storage)
    config_lib.save_config(cfg, out, cfg.storage)
    console.log_to(out, cfg.storage)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg), {"CPU": s.trial_cpus})
    tune_path = os.path.join(tune_storage, s.name, "tune") if fs is None else f"{tune_storage}/{s.name}/tune"
    tuner = make_tuner(trainable, _space(cfg), s, concurrent, tune_path, fs)
    console.say(f"sweep {s.name}: {s.num_samples} x {s.search} over {list(s.knobs)}; rungs {list(s.rungs)}; "
                f"{concurrent} trial(s) at a time ({trial_demand(cfg)['CPU']:g} CPU each)")
    # Training results (from TuneReportCallback) carry no probe_score; ASHA skips them, Tune must not reject
    # them. Tune reads this in the driver while fit() runs; the process's environment is restored afterwards.
    with environment(TUNE_DISABLE_STRICT_METRIC_CHECKING="1"):
        grid = tuner.fit()
    rows = trial_rows(grid, list(s.knobs))
    return write_outputs(cfg, rows, out)


def trial_rows(grid, knobs: list[str]) -> list[dict]:
    from cytoray.eval import validation

    rows = []
    for r in grid:
        df = r.metrics_dataframe
        probed = df[df[validation.SCORE].notna()] if df is not None and validation.SCORE in df else None
        scores = {} if probed is None else {int(st): float(v) for st, v in zip(probed["step"], probed[validation.SCORE])}
        last = max(scores) if scores else None
        rows.append({"trial": (r.metrics or {}).get("trial_id") or os.path.basename(r.path), **{k: r.config.get(k) for k in knobs},
                     "steps": last, "probe_score": scores.get(last, math.nan) if last else math.nan,
                     "best_score": max(scores.values()) if scores else math.nan,
                     "scores_by_step": json.dumps(scores), "error": "" if r.error is None else str(r.error)[:200],
                     "config": r.config})
    return rows


def write_outputs(cfg: SweepRunConfig, rows: list[dict], out: str) -> dict:
    import yaml

    knobs = list(cfg.sweep.knobs)
    ranked = sorted([r for r in rows if r["steps"] is not None],
                    key=lambda r: (r["steps"], r["probe_score"]), reverse=True)  # longest-run first, then score
    fields = ["trial", *knobs, "steps", "probe_score", "best_score", "scores_by_step", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(ranked + [r for r in rows if r["steps"] is None])
    storage.write_bytes(storage.join_uri(out, "results.csv"), buf.getvalue().encode(), cfg.storage)
    storage.write_bytes(storage.join_uri(out, "scores.png"), scores_png(rows, knobs), cfg.storage)
    summary = {"sweep": out, "trials": len(rows), "completed": sum(not r["error"] for r in rows),
               "results": storage.join_uri(out, "results.csv"), "plot": storage.join_uri(out, "scores.png")}
    if ranked:
        best = ranked[0]
        dotted = knob_overrides({k: best["config"][k] for k in knobs})
        text = (f"# best trial of sweep {cfg.sweep.name}: {best['trial']}, probe_score {best['probe_score']:.4f} "
                f"at step {best['steps']}\n# knobs: {json.dumps({k: best['config'][k] for k in knobs})}\n"
                "# use: python recipes/pretrain_vits.py --config <this file> data.manifest_uri=... run.name=...\n"
                + yaml.safe_dump(nested(dotted), sort_keys=True))
        storage.write_bytes(storage.join_uri(out, "best_overrides.yaml"), text.encode(), cfg.storage)
        summary.update(best_trial=best["trial"], best_score=best["probe_score"], best_steps=best["steps"],
                       best_knobs={k: best["config"][k] for k in knobs},
                       best_overrides=storage.join_uri(out, "best_overrides.yaml"))
    storage.write_bytes(storage.join_uri(out, "best.json"), json.dumps(summary, indent=1).encode(), cfg.storage)
    summary["table"] = format_rows(ranked + [r for r in rows if r["steps"] is None], knobs)
    return summary


def format_rows(rows: list[dict], knobs: list[str]) -> str:
    head = f"{'trial':>22s} " + " ".join(f"{k[:17]:>17s}" for k in knobs) + f" {'steps':>6s} {'probe':>6s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        score = "error" if r["error"] else f"{r['probe_score']:.3f}"
        lines.append(f"{r['trial'][-22:]:>22s} " + " ".join(f"{str(r[k])[:17]:>17s}" for k in knobs)
                     + f" {str(r['steps']):>6s} {score:>6s}")
    return "\n".join(lines)


def scores_png(rows: list[dict], knobs: list[str]) -> bytes:
    """One panel per knob: each trial's last probe score against the knob's value (marker size = steps)."""
    from cytoray.figures import figure, png_bytes

    fig, axes = figure((3.2 * len(knobs), 3.0), 1, len(knobs), squeeze=False)
    top = max([r["steps"] or 0 for r in rows] + [1])
    for ax, knob in zip(axes[0], knobs):
        values = sorted({str(r[knob]) for r in rows}, key=lambda v: (len(v), v))
        for r in rows:
            if r["steps"] is None:
                continue
            ax.scatter(values.index(str(r[knob])), r["probe_score"], s=20 + 60 * r["steps"] / top, alpha=0.7)
        ax.set_xticks(range(len(values)), values, fontsize=8)
        ax.set_xlabel(knob, fontsize=9)
        ax.set_xlim(-0.5, len(values) - 0.5)
    axes[0][0].set_ylabel("probe balanced accuracy")
    fig.suptitle("augmentation sweep: probe score per setting (marker size: steps reached)", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig, dpi=100, tight=False)


def main(argv: list[str], preset: str = "dinobloom_s", defaults: str | None = None) -> dict:
    from cytoray.platform.config import load_pretrain_config
    from cytoray.runtime import setup_logging

    # trials name their own runs (trial_<id> under the sweep dir): run.name needs no value here
    cfg = load_pretrain_config(["run.name=unused", *argv], preset, defaults, schema=SweepRunConfig)
    setup_logging(cfg.log_level)
    summary = run_sweep(cfg)
    console.say(summary["table"])
    for key in ("results", "plot", "best_overrides"):
        if key in summary:
            console.say(f"{key}: {summary[key]}")
    if "best_trial" in summary:
        console.say(f"best: {summary['best_trial']} probe_score {summary['best_score']:.3f} "
                    f"at step {summary['best_steps']} with {summary['best_knobs']}")
    return summary
