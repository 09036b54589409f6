"""Scoring a backbone the way DinoBloom reports it: frozen features -> linear probe, kNN, and patient-level
attention MIL, on labelled manifests.

- Features: ``features.extract`` runs the teacher backbone (any of the checkpoint formats, ``random:<arch>``
  for the random-init baseline, or ``handcrafted`` for the weights-free curation features) over a manifest's
  images on a Ray Data actor pool, preprocessed as the checkpoint's run recorded (``features.preprocess``);
  L2-normalised CLS (optionally CLS ‖ mean patch token). Cached as ``<cache_dir>/<key>.npz`` with
  key = hash(checkpoint bytes or name, manifest rows, settings).
- Methods: ``probe.methods`` names entries of ``eval.methods.METHODS`` (default: linear and knn).
- Linear probe: scikit-learn multinomial logistic regression (lbfgs) on standardised features, C chosen
  from ``c_grid`` by an inner stratified 3-fold CV on the training part. Protocols: ``fixed`` (manifest
  ``split`` column: train / test, BMC-style), ``kfold`` (stratified 5-fold on one set, Acevedo-style), or
  ``auto`` (fixed when the manifest has both train and test rows, else k-fold).
- kNN: faiss cosine search; k ∈ ``knn_k`` with uniform vote (DinoBloom) and k=20 with temperature-0.07
  exponential weights (DINOv2), same folds as the probe.
- Across sites (``probe.cross_site``, off by default; ``cytoray.eval.protocols``): the same methods trained on
  some datasets and scored on each held-out one (leave one dataset out, or explicit train / test datasets), beside
  the in-site protocol; the Robustness Index of the features on every manifest with >= 2 sites.
- Metrics: accuracy, balanced accuracy, weighted F1, per-class recall, confusion matrix (also as PNG).
- MIL: gated-attention ABMIL (Ilse et al. 2018) over per-patient bags of cell features, k-fold by patient,
  balanced accuracy and weighted F1 (``cytoray.eval.mil``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from cytoray.config import location_field
from cytoray.eval.methods import METHODS
from cytoray.eval.metrics import ProbeError, confusion_png, metrics
from cytoray.eval.mil import MILConfig, evaluate_mil, evaluate_mil_cross_site
from cytoray.eval.protocols import (
    CrossSiteConfig,
    check_settings,
    cross_site_scores,
    robustness_index,
    site_folds,
    site_values,
)
from cytoray.runtime import RayConfig
from cytoray.storage import StorageConfig

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    """How a backbone is scored on a labelled manifest."""

    label_column: str = "cell_type"
    methods: list[str] = field(default_factory=lambda: ["linear", "knn"])  # entries of eval.methods.METHODS
    protocol: str = "auto"  # auto | fixed | kfold
    folds: int = 5
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    max_iter: int = 1000
    knn_k: list[int] = field(default_factory=lambda: [1, 20])
    knn_weighted_k: int = 20
    knn_temperature: float = 0.07
    image_size: int | None = None  # None: the run's recorded crop size; files without a record: min(img_size, 224)
    cls_and_patch: bool = False  # features = CLS ‖ mean patch token
    batch_size: int = 64
    num_actors: int = 1  # Ray Data actor pool size; 0: extract in the calling process (per-checkpoint scoring)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    cache_dir: str | None = location_field()  # feature cache; None: no cache
    min_per_class: int = 2  # classes with fewer labelled images are reported and left out
    mil: bool = False
    mil_label_column: str = "patient_label"
    mil_folds: int = 5
    mil_epochs: int = 60
    cross_site: CrossSiteConfig = field(default_factory=CrossSiteConfig)  # train on some sites, test on others
    headline: str = "in_site"  # probe_score: in_site | cross_site (mean over held-out sites), linear probe
    seed: int = 0


# ------------------------------------------------------------------------------------------ features


# Part of every cache key: raise it whenever a change to the code makes the same checkpoint and settings give
# other features, so no stale cache entry is ever reused.
FEATURES_VERSION = 2


def _cache_key(spec: str, rows, cfg: ProbeConfig, storage_cfg) -> str:
    from cytoray import storage
    from cytoray.platform.models.checkpoints import TRAIN_STATE, is_training_checkpoint

    h = hashlib.sha256()
    if spec.startswith("random:") or spec == "handcrafted":
        h.update(spec.encode())
    elif is_training_checkpoint(spec, storage_cfg):  # DCP directory: its metadata names every shard's bytes
        for name in (".metadata", TRAIN_STATE):
            h.update(hashlib.sha256(storage.read_bytes(storage.join_uri(spec, name), storage_cfg)).digest())
    else:
        h.update(hashlib.sha256(storage.read_bytes(spec, storage_cfg)).digest())
    h.update("\n".join(f"{i}\t{u}" for i, u in zip(rows.column("image_id").to_pylist(),
                                                   rows.column("uri").to_pylist())).encode())
    h.update(json.dumps([cfg.image_size, cfg.cls_and_patch, FEATURES_VERSION]).encode())
    return h.hexdigest()[:24]


def feature_spec(spec: str, cfg: ProbeConfig):
    from cytoray.features.extract import FeatureSpec

    return FeatureSpec(backbone=spec, image_size=cfg.image_size, cls_and_patch=cfg.cls_and_patch)


def extract_features(spec: str, rows, cfg: ProbeConfig, storage_cfg=None) -> np.ndarray:
    """(N, D) float32 L2-normalised features of ``rows`` (pyarrow table with image_id, uri), in row order."""
    from cytoray import storage
    from cytoray.features.extract import PoolSpec, extract_table, normalise
    from cytoray.tables import unpack_vectors

    key = _cache_key(spec, rows, cfg, storage_cfg) if cfg.cache_dir else None
    cache = storage.join_uri(cfg.cache_dir, f"{key}.npz") if key else None
    if cache and storage.exists(cache, storage_cfg):
        return np.load(io.BytesIO(storage.read_bytes(cache, storage_cfg)))["features"]
    pool = PoolSpec(cfg.batch_size, cfg.num_actors, cfg.num_cpus, cfg.num_gpus)
    table = extract_table(rows, feature_spec(spec, cfg), pool, storage_cfg, "probe features")
    f, _ = normalise(unpack_vectors(table.column("feature")), spec)
    if cache:
        buf = io.BytesIO()
        np.savez(buf, features=f)
        storage.write_bytes(cache, buf.getvalue(), storage_cfg)
    return f


# ------------------------------------------------------------------------------------------ scoring


def splits(y: np.ndarray, split_col: np.ndarray | None, cfg: ProbeConfig) -> tuple[str, list]:
    """(protocol, [(train idx, test idx), ...])."""
    from sklearn.model_selection import StratifiedKFold

    has_fixed = split_col is not None and {"train", "test"} <= set(split_col.tolist())
    protocol = cfg.protocol if cfg.protocol != "auto" else ("fixed" if has_fixed else "kfold")
    if protocol == "fixed":
        if not has_fixed:
            raise ProbeError("probe.protocol=fixed needs a 'split' column with train and test rows")
        return protocol, [(np.flatnonzero(split_col == "train"), np.flatnonzero(split_col == "test"))]
    if protocol != "kfold":
        raise ProbeError(f"probe.protocol={cfg.protocol!r}: choose auto, fixed or kfold")
    folds = min(cfg.folds, int(np.bincount(y).min()))
    if folds < 2:
        raise ProbeError("k-fold probing needs >= 2 images per class")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    return protocol, list(skf.split(np.zeros(len(y)), y))


def score_features(feats: np.ndarray, labels: list, split_col, cfg: ProbeConfig, sites: list | None = None,
                   where: str = "the manifest") -> dict:
    """Linear probe + kNN results on one manifest's features (rows without a label are left out); with ``sites``
    (each row's site) also the cross-site protocol of ``cfg.cross_site`` and the Robustness Index."""
    labels = np.array([None if (v is None or v != v) else str(v) for v in labels], dtype=object)
    have = np.array([v is not None for v in labels])
    counts = {c: int((labels[have] == c).sum()) for c in sorted(set(labels[have].tolist()))}
    classes = [c for c, n in counts.items() if n >= cfg.min_per_class]
    dropped = {c: n for c, n in counts.items() if n < cfg.min_per_class}
    use = have & np.isin(labels, classes)
    if len(classes) < 2:
        raise ProbeError(f"probing needs >= 2 classes with >= {cfg.min_per_class} labelled images; found {counts}")
    x, y = feats[use], np.array([classes.index(v) for v in labels[use]])
    protocol, folds = splits(y, None if split_col is None else np.asarray(split_col, dtype=object)[use], cfg)
    check_methods(cfg)
    methods: dict[str, list] = {}
    info: dict = {}
    for tr, te in folds:
        for name in cfg.methods:
            for output, pred in METHODS[name](x[tr], y[tr], x[te], len(classes), cfg, info).items():
                methods.setdefault(output, []).append((y[te], pred))
    out = {"protocol": protocol, "folds": len(folds), "images": int(use.sum()), "classes": classes,
           "left_out_classes": dropped, "unlabelled": int((~have).sum()), **info, "methods": {}}
    for name, parts in methods.items():
        yt = np.concatenate([a for a, _ in parts])
        yp = np.concatenate([b for _, b in parts])
        out["methods"][name] = metrics(yt, yp, classes)
    if sites is not None:
        s = site_values(sites)[use]
        if cfg.cross_site.protocol != "none":
            out["cross_site"] = cross_site_scores(x, y, s, classes, cfg, {}, where)
        named = np.array([v is not None for v in s], bool)
        if cfg.cross_site.robustness_k > 0 and len(set(s[named].tolist())) >= 2:
            out["robustness"] = robustness_index(x[named], y[named], s[named], cfg.cross_site.robustness_k)
    return out


def check_methods(cfg: ProbeConfig) -> None:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown or not cfg.methods:
        raise ProbeError(f"probe.methods={cfg.methods}: choose from {sorted(METHODS)}")


def read_labelled_manifest(uri: str, cfg: ProbeConfig, storage_cfg=None):
    """A labelled manifest with image_id, uri and the label columns the configured probes need."""
    from cytoray.manifest import ManifestError, read_manifest
    from cytoray.runtime import working_dir_note

    try:
        table = read_manifest(uri, storage_cfg, purpose="labelled manifest", fix=manifest_command(uri))
    except ManifestError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise ProbeError(f"labelled manifest {uri} does not exist{working_dir_note(uri)}") from None
        raise ProbeError(str(exc)) from None
    cols = set(table.column_names)
    missing = {"image_id", "uri"} - cols
    has_patients = {"patient_id", cfg.mil_label_column} <= cols
    if not missing and cfg.label_column not in cols and not (cfg.mil and has_patients):
        missing = {cfg.label_column} | ({"patient_id", cfg.mil_label_column} - cols if cfg.mil else set())
    if missing:
        raise ProbeError(f"labelled manifest {uri} lacks columns {sorted(missing)} (has {table.column_names}); "
                         "probe.label_column picks the cell label column; with --mil (probe.mil=true) a manifest "
                         "of patient_id + probe.mil_label_column suffices")
    check_settings(cfg.cross_site, cfg.headline)
    site = cfg.cross_site.site_column
    if cfg.cross_site.protocol != "none":  # the site column, >= 2 sites, every named site: before any feature
        if site not in cols:
            raise ProbeError(f"labelled manifest {uri} lacks the site column {site!r} that probe.cross_site.protocol"
                             f"={cfg.cross_site.protocol} splits by (has {table.column_names}); "
                             "probe.cross_site.site_column names it")
        site_folds(site_values(table.column(site).to_pylist()), cfg.cross_site, uri)
    return table


def manifest_command(uri: str) -> str:
    """How to make a labelled manifest of a folder of class folders or a label table (the fix a probe names)."""
    base = uri.rstrip("/")
    out = f"{os.path.splitext(base)[0] if base.lower().endswith(('.csv', '.tsv')) else base}-manifest"  # labels.csv: labels-manifest
    return (f"a labelled manifest is Parquet (image_id, uri, label column); for class folders or a label table "
            f"run: python recipes/manifest.py --dataset {uri} --out {out}  and probe --manifest "
            f"{out}/manifest.parquet (docs/evaluation.md)")


def preflight(manifests: list[str], cfg: ProbeConfig, storage_cfg=None) -> None:
    """Before any feature is extracted: every manifest reads with the columns the probe needs, and its first
    images open (``manifest.check_images``) — a wrong location fails in seconds, in one line."""
    from cytoray.manifest import check_images

    check_methods(cfg)  # a mistyped method fails here, not after every backbone's features
    for uri in manifests:
        check_images(read_labelled_manifest(uri, cfg, storage_cfg), uri, storage_cfg, purpose="labelled manifest")


def _has_cell_labels(table, cfg: ProbeConfig) -> bool:
    col = table.column(cfg.label_column) if cfg.label_column in table.column_names else None
    return col is not None and col.null_count < len(col)


def evaluate(spec: str, manifests: list[str], cfg: ProbeConfig, storage_cfg=None) -> list[dict]:
    """Score one backbone (checkpoint URI, ``random:<arch>`` or ``handcrafted``) on every manifest."""
    results = []
    for uri in manifests:
        table = read_labelled_manifest(uri, cfg, storage_cfg)
        sites = (table.column(cfg.cross_site.site_column).to_pylist()
                 if cfg.cross_site.site_column in table.column_names else None)
        cells = _has_cell_labels(table, cfg)
        patients = cfg.mil and {"patient_id", cfg.mil_label_column} <= set(table.column_names)
        if not cells and not patients:
            raise ProbeError(f"{uri}: column {cfg.label_column!r} has no labels; set probe.label_column, or pass "
                             "--mil (probe.mil=true) with patient_id + probe.mil_label_column for ABMIL only")
        feats = extract_features(spec, table.select(["image_id", "uri"]), cfg, storage_cfg)
        res = {"methods": {}, "protocol": "-", "images": table.num_rows}
        if cells:  # a MIL-only manifest (patient labels, unlabelled cells) skips the cell-level probe
            split_col = table.column("split").to_pylist() if "split" in table.column_names else None
            res = score_features(feats, table.column(cfg.label_column).to_pylist(), split_col, cfg, sites, uri)
        res.update({"checkpoint": spec, "manifest": uri, "feature_dim": int(feats.shape[1])})
        if patients:
            pids, plabels = table.column("patient_id").to_pylist(), table.column(cfg.mil_label_column).to_pylist()
            mil_cfg = MILConfig(folds=cfg.mil_folds, epochs=cfg.mil_epochs, seed=cfg.seed)
            res["mil"] = evaluate_mil(feats, pids, plabels, mil_cfg)
            if cfg.cross_site.protocol != "none":
                res["mil"]["cross_site"] = evaluate_mil_cross_site(feats, pids, plabels, site_values(sites),
                                                                   cfg.cross_site, mil_cfg, uri)
        results.append(res)
    return results


CROSS_SITE_SHORT = {"leave_one_dataset_out": "LODO", "explicit": "explicit"}  # the table's protocol column


def _short_names(r: dict) -> tuple[str, str]:
    name = r["checkpoint"] if len(r["checkpoint"]) <= 40 else "…" + r["checkpoint"][-39:]
    man = os.path.basename(os.path.dirname(r["manifest"])) + "/" + os.path.basename(r["manifest"])
    return name, man if len(man) <= 28 else "…" + man[-27:]


def results_table(results: list[dict]) -> str:
    """A DinoBloom-style text table: one row per (checkpoint, manifest), columns per method and metric."""
    lines = []
    header = f"{'checkpoint':40s} {'manifest':28s} {'protocol':8s} {'method':14s} {'acc':>6s} {'bal.acc':>7s} {'wF1':>6s}"
    lines.append(header)
    lines.append("-" * len(header))
    for r in results:
        name, man = _short_names(r)
        for m, v in r["methods"].items():
            lines.append(f"{name:40s} {man:28s} {r['protocol']:8s} {m:14s} {v['accuracy']:6.3f} "
                         f"{v['balanced_accuracy']:7.3f} {v['weighted_f1']:6.3f}")
        if "mil" in r:
            v = r["mil"]
            lines.append(f"{name:40s} {man:28s} {'patient':8s} {'ABMIL':14s} {v['accuracy']:6.3f} "
                         f"{v['balanced_accuracy']:7.3f} {v['weighted_f1']:6.3f}")
        lines.extend(_cross_site_lines(r, name, man))
    return "\n".join(lines + _robustness_lines(results))


COMPARED = ("linear", "knn20", "ABMIL")  # comparison_table's methods (as the per-checkpoint table's)


def comparison_table(results: list[dict], methods=COMPARED) -> str:
    """Backbones side by side (the demo's table): per checkpoint, manifest and method (``methods``; None: all) the
    balanced accuracy in-site, as the mean over held-out sites and at the worst held-out site ('-' where the
    manifest was probed in-site only); the Robustness Index block below. Every other figure is in results.json."""
    shown = [m for r in results for m in [*r["methods"], *(["ABMIL"] if "mil" in r else [])]
             if methods is None or m in methods]
    w = max([6, *map(len, shown)])  # the method column
    lines = [f"{'checkpoint':40s} {'manifest':28s} {'method':{w}s} {'in-site':>7s} {'cross-site':>10s}  worst site"]
    lines.append("-" * (len(lines[0]) + 6))
    order = list(dict.fromkeys(r["checkpoint"] for r in results))  # each backbone's rows together
    for r in sorted(results, key=lambda r: order.index(r["checkpoint"])):
        name, man = _short_names(r)
        cross = dict(r.get("cross_site", {}).get("methods", {}))
        parts = list(r["methods"].items())
        if "mil" in r:
            parts.append(("ABMIL", r["mil"]))
            if "cross_site" in r["mil"]:
                cross["ABMIL"] = r["mil"]["cross_site"]
        for m, v in parts:
            if methods is not None and m not in methods:
                continue
            if m in cross:
                worst = min(cross[m]["per_site"].items(), key=lambda kv: kv[1]["balanced_accuracy"])
                mean = f"{cross[m]['mean']['balanced_accuracy']:10.3f}"
                low = f"{worst[1]['balanced_accuracy']:.3f} {worst[0]}"  # the whole name: sites may share a prefix
            else:
                mean, low = f"{'-':>10s}", "-"
            lines.append(f"{name:40s} {man:28s} {m:{w}s} {v['balanced_accuracy']:7.3f} {mean}  {low}")
    return "\n".join(lines + _robustness_lines(results))


def _robustness_lines(results: list[dict]) -> list[str]:
    ri = [r for r in results if "robustness" in r]
    if not ri:
        return []
    lines = ["", "site confounding, Robustness Index over each image's k nearest neighbours: SO (same class, other "
             "site) / OS (other class, same site); > 1, share > 0.5: biology dominates",
             f"{'checkpoint':40s} {'manifest':28s} {'k':>4s} {'RI':>7s} {'SO/(SO+OS)':>10s}"]
    for r in ri:
        name, man = _short_names(r)
        v = r["robustness"]
        lines.append(f"{name:40s} {man:28s} {v['k']:4d} {_ratio(v['robustness_index']):>7s} "
                     f"{_ratio(v['biology_share']):>10s}")
    return lines


def _ratio(value: float | None) -> str:
    """A Robustness Index figure, '-' where the ratio is undefined (None)."""
    return "-" if value is None else f"{value:.3f}"


def _cross_site_lines(r: dict, name: str, man: str) -> list[str]:
    """Across sites: each method's mean over the held-out sites; for linear and ABMIL also each site."""
    parts = list(r.get("cross_site", {}).get("methods", {}).items())
    parts += [("ABMIL", r["mil"]["cross_site"])] if "cross_site" in r.get("mil", {}) else []
    lines = []
    for m, v in parts:
        proto = CROSS_SITE_SHORT[(r.get("cross_site") or r["mil"]["cross_site"])["protocol"]]
        rows = [(m, v["mean"])]
        if m in ("linear", "ABMIL"):
            rows += [(f"{m}:{site}", x) for site, x in v["per_site"].items()]  # whole: sites may share a prefix
        for label, x in rows:
            lines.append(f"{name:40s} {man:28s} {proto:8s} {label:14s} {x['accuracy']:6.3f} "
                         f"{x['balanced_accuracy']:7.3f} {x['weighted_f1']:6.3f}")
    return lines


def run_probe(checkpoints: list[str], manifests: list[str], cfg: ProbeConfig, out_uri: str | None = None,
              storage_cfg=None) -> list[dict]:
    """Score every checkpoint on every manifest; write results.json + confusion PNGs under ``out_uri``."""
    from cytoray import storage

    results = []
    for spec in checkpoints:
        results.extend(evaluate(spec, manifests, cfg, storage_cfg))
    if cfg.mil and not any("mil" in r for r in results):
        raise ProbeError(f"--mil: none of {manifests} has patient_id and {cfg.mil_label_column!r} columns")
    if out_uri:
        for n, r in enumerate(results):
            if not r["methods"]:
                continue
            png = f"confusion_{n:02d}_{hashlib.sha1((r['checkpoint'] + r['manifest']).encode()).hexdigest()[:8]}.png"
            storage.write_bytes(storage.join_uri(out_uri, png), confusion_png(r), storage_cfg)
            r["confusion_png"] = storage.join_uri(out_uri, png)
        storage.write_bytes(storage.join_uri(out_uri, "results.json"), json.dumps(results, indent=2).encode(),
                            storage_cfg)
    return results


@dataclass
class ProbeSettings:
    """What ``recipes/probe.py`` reads from --config files and key=value overrides."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log_level: str = "WARNING"


def main(argv: list[str]) -> list[dict]:
    import argparse

    from cytoray import config, console, storage
    from cytoray.features.backbone import HANDCRAFTED, RANDOM_PREFIX
    from cytoray.runtime import init_ray, setup_logging

    ap = argparse.ArgumentParser(description="linear probe + kNN scores of checkpoints on labelled manifests")
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="checkpoint URI, random:<arch> or handcrafted (repeatable)")
    ap.add_argument("--manifest", action="append", required=True, help="labelled manifest URI (repeatable)")
    ap.add_argument("--out", default=None, help="directory for results.json and confusion matrices")
    ap.add_argument("--mil", action="store_true", help="also run patient-level ABMIL where patient labels exist")
    args, rest = ap.parse_known_args(argv)
    # relative local paths: against the working directory, here, where the user typed them (storage.absolute)
    args.checkpoint = [c if c.startswith(RANDOM_PREFIX) or c == HANDCRAFTED else storage.absolute(c)
                       for c in args.checkpoint]
    args.manifest = [storage.absolute(m) for m in args.manifest]
    args.out = storage.absolute(args.out) if args.out else None
    files, overrides = config.split_cli(rest)
    cfg = config.load_config(ProbeSettings, files[0] if files else None, files[1:], overrides)
    cfg = config.to_object(cfg)
    if args.mil:
        cfg.probe.mil = True
    setup_logging(cfg.log_level)
    preflight(args.manifest, cfg.probe, cfg.storage)  # in seconds, before Ray starts
    init_ray(cfg.ray)
    if args.out:
        console.log_to(args.out, cfg.storage)
    with console.stage("probe features"):  # Ray Data progress lines name the step
        results = run_probe(args.checkpoint, args.manifest, cfg.probe, args.out, cfg.storage)
    console.say(results_table(results))
    if args.out:
        console.say(f"results: {storage.join_uri(args.out, 'results.json')}")
    return results
