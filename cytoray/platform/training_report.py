"""``<run>/training.html``: a training run at a glance, one self-contained page (figures as data URIs, no network).

Sections: the run (name, preset, backbone, steps, workers, batch); loss terms over steps; the probe score of every
scored checkpoint per manifest, method and metric, in-site and as the mean over held-out sites, and the Robustness
Index where computed; collapse monitors (teacher target entropy, prototype usage, logit and feature spread); schedules (lr, weight decay, teacher momentum and temperature);
gradient norms per student part before clipping and whether each part was clipped; throughput and data wait;
every other per-step metric. Each figure has a
table of first / last / min / max below it. The page reads what the run wrote: ``config.yaml``, ``metrics.csv``
(``metrics.MetricsLog``) and ``eval/results.csv`` (``eval.validation``); a missing or malformed file becomes a
note on the page and a warning, not an error.
"""

from __future__ import annotations

import csv
import html
import io
import logging
import math
import time

import numpy as np

from cytoray import storage
from cytoray.eval import validation
from cytoray.pages import RENDER_CHECK, page, png_uri, table
from cytoray.platform.metrics import CSV_NAME

log = logging.getLogger(__name__)

REPORT_NAME = "training.html"
SCHEDULES = {"lr": "learning rate", "wd": "weight decay", "momentum": "teacher momentum (EMA)",
             "teacher_temp": "teacher temperature"}
THROUGHPUT = {"images_per_s": "images / s", "data_wait_frac": "data wait (share of the step)",
              "data_wait_s": "data wait (s)", "step_time_s": "step time (s)", "gpu_mem_gb": "peak GPU memory (GB)"}
PROBE_METRICS = ("balanced_accuracy", "accuracy", "weighted_f1")
# what tells a collapsing or idle objective apart (objective.teacher_monitors); what the preset choice rests on
COLLAPSE = {"teacher_entropy": "teacher target entropy (nats; log K: uniform)",
            "prototype_usage": "prototype usage (distinct argmax targets / rows)",
            "teacher_logit_std": "teacher logit std across images",
            "teacher_feature_std": "teacher CLS std (normalised)",
            "student_feature_std": "student CLS std (normalised)", "teacher_center_norm": "teacher centre norm"}


def read_metrics(uri: str, storage_cfg=None) -> tuple[np.ndarray, dict[str, np.ndarray], str | None]:
    """(steps, {column: values}, note) from ``metrics.csv``; unparsable cells are NaN, rows without a step are
    skipped, and ``note`` says what was missing or skipped (None when the file is clean)."""
    if not storage.exists(uri, storage_cfg):
        return np.zeros(0, int), {}, f"{uri} does not exist"
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(uri, storage_cfg).decode(errors="replace"))))
    if not rows or "step" not in rows[0]:
        return np.zeros(0, int), {}, f"{uri} has no rows with a 'step' column"
    steps, kept = [], []
    for r in rows:
        try:
            steps.append(int(r["step"]))
            kept.append(r)
        except (TypeError, ValueError):
            continue
    columns = {k: np.array([_number(r.get(k)) for r in kept]) for k in rows[0] if k and k != "step"}
    skipped = len(rows) - len(kept)
    return np.array(steps, int), columns, f"{skipped} malformed rows of {uri} skipped" if skipped else None


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _stats(names: dict[str, str], columns: dict[str, np.ndarray]) -> str:
    rows = []
    for key, title in names.items():
        v = columns[key]
        finite = v[np.isfinite(v)]
        rows.append([title, *(f"{x:.4g}" for x in (v[0], v[-1]))]
                    + ([f"{finite.min():.4g}", f"{finite.max():.4g}"] if len(finite) else ["-", "-"]))
    return table(["metric", "first", "last", "min", "max"], rows)


def _curves(steps: np.ndarray, columns: dict[str, np.ndarray], names: dict[str, str]) -> str:
    """Small multiples, one panel per metric: each step thin, a running mean over ~1/25 of the run on top."""
    import pandas as pd

    from cytoray.figures import figure

    ncols = min(len(names), 3)
    nrows = math.ceil(len(names) / ncols)
    fig, axes = figure((4.4 * ncols, 2.7 * nrows), nrows, ncols, squeeze=False)
    window = max(1, len(steps) // 25)
    for ax, (key, title) in zip(axes.flat, names.items()):
        v = columns[key]
        ax.plot(steps, v, lw=0.7, alpha=0.5 if window > 1 else 1.0, color="tab:blue")
        if window > 1:
            ax.plot(steps, pd.Series(v).rolling(window, min_periods=1).mean(), lw=1.5, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return f"<img alt='{html.escape(', '.join(names))}' src='{png_uri(fig)}'>" + _stats(names, columns)


def _probe(rows: list[dict], robustness: list[dict] | None = None) -> str:
    """One panel per metric, a line per manifest/method: in-site solid, the mean over held-out sites
    (``cross_site/<method>``) dashed in the same colour — not one line per site; the sites' figures stay in
    results.csv. With ``robustness`` (``validation.read_robustness``) a panel of the Robustness Index's share
    SO/(SO+OS) per checkpoint. The balanced-accuracy table below."""
    from cytoray.figures import figure

    cross = validation.CROSS_SITE
    series = sorted({(r["manifest"], r["method"]) for r in rows if r["method"].count("/") < 2},
                    key=lambda mk: (mk[0], mk[1].removeprefix(cross), mk[1].startswith(cross)))
    value = {(int(r["step"]), r["manifest"], r["method"], k): _number(r.get(k)) for r in rows for k in PROBE_METRICS}
    steps = sorted({int(r["step"]) for r in rows})
    panels = len(PROBE_METRICS) + bool(robustness)
    legend_rows = math.ceil(len(series) / 4)
    fig, axes = figure((4.4 * panels, 3.2 + 0.25 * legend_rows), 1, panels, squeeze=False)
    bases = sorted({(m, k.removeprefix(cross)) for m, k in series})
    colour = {base: f"C{i % 10}" for i, base in enumerate(bases)}
    for ax, metric in zip(axes.flat, PROBE_METRICS):
        for manifest, method in series:
            xs = [s for s in steps if (s, manifest, method, metric) in value]
            site = method.startswith(cross)
            ax.plot(xs, [value[(s, manifest, method, metric)] for s in xs], marker="s" if site else "o", ms=3,
                    ls="--" if site else "-", color=colour[(manifest, method.removeprefix(cross))],
                    label=f"{manifest}/{method.removeprefix(cross)}" + (" (across sites)" if site else " (in-site)"))
        ax.set_title(metric.replace("_", " "), fontsize=10)
    if robustness:
        ax = axes.flat[-1]
        for manifest in sorted({r["manifest"] for r in robustness}):
            pts = sorted((r["step"], r["biology_share"]) for r in robustness
                         if r["manifest"] == manifest and r["biology_share"] is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color="k", label=f"{manifest}/RI")
        ax.axhline(0.5, color="0.6", lw=0.8)
        ax.set_title("site confounding: SO / (SO + OS)\n(> 0.5: neighbours by cell type)", fontsize=9)
    for ax in axes.flat:
        ax.set_xlabel("checkpoint step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.25 * legend_rows / (3.2 + 0.25 * legend_rows) + 0.02, 1, 1))
    cells = [[s] + [f"{value.get((s, m, k, 'balanced_accuracy'), math.nan):.3f}" for m, k in series] for s in steps]
    ri_cells = ""
    if robustness:
        ri_cells = table(["step", "manifest", "k", "RI = SO / OS", "SO / (SO + OS)"],
                         [[r["step"], r["manifest"], r["k"], _ratio(r["robustness_index"]),
                           _ratio(r["biology_share"])] for r in robustness])
    return (f"<img alt='probe scores' src='{png_uri(fig)}'><p class='note'>Balanced accuracy per checkpoint; "
            f"<code>{cross}&lt;method&gt;</code>: the mean over held-out sites (each site, and every metric: "
            f"<code>{validation.EVAL_DIR}/{validation.RESULTS_CSV}</code>)</p>"
            + table(["step"] + [f"{m}/{k}" for m, k in series], cells) + ri_cells)


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _header(run_uri: str, cfg: dict, steps: np.ndarray) -> str:
    model, train = cfg.get("model") or {}, cfg.get("train") or {}
    total, max_steps = model.get("total_iters"), train.get("max_steps")
    end = min(total, max_steps) if total and max_steps else total
    workers = train.get("num_workers")
    batch = model.get("global_batch_size") or (
        model["batch_size_per_device"] * workers if isinstance(workers, int) and "batch_size_per_device" in model
        else None)
    rows = [["run", (cfg.get("run") or {}).get("name", "?")], ["directory", run_uri],
            ["preset", cfg.get("preset", "?")], ["backbone", (model.get("vit") or {}).get("arch", "?")],
            ["steps", f"{int(steps.max()) + 1 if len(steps) else 0} of {end if end else '?'}"],
            ["workers", f"{workers[0]}-{workers[1]} (elastic)" if isinstance(workers, list) else workers],
            ["global batch", batch if batch else "?"], ["written", time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                 time.gmtime())]]
    return table(["", ""], rows)


def _gradient_order(key: str) -> tuple[int, str]:
    """Joint norm, then each part's norm, then each part's clipping flag."""
    return (0 if key == "grad_norm" else 1 if key.startswith("grad_norm_") else 2, key)


def _gradient_title(key: str) -> str:
    if key == "grad_norm":
        return "grad norm (all student parameters)"
    if key.startswith("grad_norm_"):
        return f"grad norm: {key[len('grad_norm_'):]}"
    if key.startswith("grad_clipped_"):
        return f"clipped (1) or not (0): {key[len('grad_clipped_'):]}"
    return key


def build_training_report(run_uri: str, storage_cfg=None) -> str:
    import yaml

    notes, cfg = [], {}
    config_uri = storage.join_uri(run_uri, "config.yaml")
    if not storage.exists(config_uri, storage_cfg):
        notes.append(f"{config_uri} does not exist")
    else:
        try:
            cfg = yaml.safe_load(storage.read_bytes(config_uri, storage_cfg)) or {}
        except yaml.YAMLError as exc:
            notes.append(f"{config_uri} is not valid yaml: {str(exc).splitlines()[0]}")
    steps, columns, note = read_metrics(storage.join_uri(run_uri, CSV_NAME), storage_cfg)
    notes += [note] if note else []
    probe_rows = validation.read_results_table(run_uri, storage_cfg)
    try:
        robustness = validation.read_robustness(run_uri, storage_cfg) if probe_rows else []
        probe = _probe(probe_rows, robustness) if probe_rows else ("<p class='note'>no per-checkpoint probe in this run "
                                                       "(<code>eval.manifests</code> turns it on)</p>")
    except (KeyError, TypeError, ValueError) as exc:
        problem = f"{validation.EVAL_DIR}/{validation.RESULTS_CSV} of {run_uri} is malformed ({exc!r})"
        log.warning("training report: %s", problem)
        probe = f"<p class='note'>{html.escape(problem)}</p>"
    for n in notes:
        log.warning("training report: %s", n)

    def section(key, title, names, empty):
        names = {k: v for k, v in names.items() if k in columns}
        body = _curves(steps, columns, names) if names and len(steps) else f"<p class='note'>{empty}</p>"
        return f"<section id='{key}'><h2>{title}</h2>{body}</section>"

    losses = {k: k for k in ["loss"] + sorted(k for k in columns if k.endswith("_loss"))}
    gradients = {k: _gradient_title(k) for k in sorted(columns, key=_gradient_order) if k.startswith("grad_")}
    shown = set(losses) | set(SCHEDULES) | set(THROUGHPUT) | set(gradients) | set(COLLAPSE)
    name = (cfg.get("run") or {}).get("name", "?")
    parts = [f"<h1>cytoray training: {html.escape(str(name))}</h1>", RENDER_CHECK,
             "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes),
             f"<section id='run'><h2>Run</h2>{_header(run_uri, cfg, steps)}</section>",
             section("losses", "Loss terms", losses, "no loss values in metrics.csv"),
             f"<section id='probe'><h2>Probe score per checkpoint</h2>{probe}</section>",
             section("collapse", "Collapse monitors (teacher targets, prototypes, feature spread)", COLLAPSE,
                     "no collapse monitors in metrics.csv"),
             section("schedules", "Schedules", SCHEDULES, "no schedule values in metrics.csv"),
             section("gradients", "Gradient norms before clipping (per student part) and clipping", gradients,
                     "no gradient norms in metrics.csv"),
             section("throughput", "Throughput and data wait", THROUGHPUT, "no throughput values in metrics.csv"),
             section("other", "Other per-step metrics", {k: k for k in columns if k not in shown},
                     "no other metrics in metrics.csv")]
    return page(f"cytoray training: {name}", "".join(parts))


def write_training_report(run_uri: str, storage_cfg=None) -> str:
    """Write ``<run>/training.html`` (local or object storage); returns its URI."""
    uri = storage.join_uri(run_uri, REPORT_NAME)
    storage.write_bytes(uri, build_training_report(run_uri, storage_cfg).encode(), storage_cfg)
    return uri
