"""Scoring a backbone the way DinoBloom reports it: frozen features -> linear probe, kNN, and patient-level
attention MIL, on labelled manifests.

- Features: a Ray Data ``map_batches`` actor pool runs the teacher backbone (any of the three checkpoint
  formats, or ``random:<arch>`` for the random-init baseline, or ``handcrafted`` for the weights-free
  curation features) over a manifest's images; L2-normalised CLS (optionally CLS ‖ mean patch token).
  Cached as ``<cache_dir>/<key>.npz`` with key = hash(checkpoint bytes or name, manifest rows, settings).
- Linear probe: scikit-learn multinomial logistic regression (lbfgs) on standardised features, C chosen
  from ``c_grid`` by an inner stratified 3-fold CV on the training part. Protocols: ``fixed`` (manifest
  ``split`` column: train / test, BMC-style), ``kfold`` (stratified 5-fold on one set, Acevedo-style), or
  ``auto`` (fixed when the manifest has both train and test rows, else k-fold).
- kNN: faiss cosine search; k ∈ ``knn_k`` with uniform vote (DinoBloom) and k=20 with temperature-0.07
  exponential weights (DINOv2), same folds as the probe.
- Metrics: accuracy, balanced accuracy, weighted F1, per-class recall, confusion matrix (also as PNG).
- MIL: gated-attention ABMIL (Ilse et al. 2018) over per-patient bags of cell features, k-fold by patient,
  balanced accuracy and weighted F1 (``cytoray.platform.mil``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from cytoray.runtime import RayConfig
from cytoray.storage import StorageConfig

log = logging.getLogger(__name__)


@dataclass
class ProbeConfig:
    label_column: str = "cell_type"
    protocol: str = "auto"  # auto | fixed | kfold
    folds: int = 5
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    max_iter: int = 1000
    knn_k: list[int] = field(default_factory=lambda: [1, 20])
    knn_weighted_k: int = 20
    knn_temperature: float = 0.07
    image_size: int | None = None  # default: the backbone's img_size, at most 224 (DINOv2 hub weights: 518)
    cls_and_patch: bool = False  # features = CLS ‖ mean patch token
    batch_size: int = 64
    num_actors: int = 1  # Ray Data actor pool size; 0: extract in the calling process (per-checkpoint scoring)
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    cache_dir: str | None = None  # feature cache; None: no cache
    min_per_class: int = 2  # classes with fewer labelled images are reported and left out
    mil: bool = False
    mil_label_column: str = "patient_label"
    mil_folds: int = 5
    mil_epochs: int = 60
    seed: int = 0


class ProbeError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ features


def load_backbone(spec: str, storage_cfg=None):
    """``random:<arch>[:<patch>:<img_size>]`` (random init, seed 0) or a checkpoint URI."""
    import torch

    from cytoray.platform.models.checkpoints import build_from_checkpoint
    from cytoray.platform.models.vit import build_vit

    if spec.startswith("random:"):
        parts = spec.split(":")
        kw = {"arch": parts[1]}
        if len(parts) > 2:
            kw["patch_size"] = int(parts[2])
        if len(parts) > 3:
            kw["img_size"] = int(parts[3])
        if parts[1] == "vit_debug":
            kw.setdefault("patch_size", 8)
            kw.setdefault("img_size", 64)
            kw["layerscale"] = 0.1
        torch.manual_seed(0)
        return build_vit(**kw).eval()
    return build_from_checkpoint(spec, storage_cfg).eval()


class FeatureBatch:
    """Ray Data actor: the backbone once per actor, features per batch of (image_id, uri) rows."""

    def __init__(self, spec: str, image_size: int | None, cls_and_patch: bool, storage_cfg, use_gpu: bool):
        import torch

        from cytoray.runtime import keep_image_buffers_on_heap

        keep_image_buffers_on_heap()
        self.spec, self.storage_cfg, self.cls_and_patch = spec, storage_cfg, cls_and_patch
        if spec == "handcrafted":
            from cytoray.curation.embed import EmbedConfig, HandcraftedEmbedder

            self.handcrafted = HandcraftedEmbedder(EmbedConfig())
            return
        self.handcrafted = None
        self.model = load_backbone(spec, storage_cfg)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.size = image_size or min(self.model.cfg.img_size, 224)  # DinoBloom's probe size

    def __call__(self, batch):
        import pyarrow as pa

        from cytoray import images, storage
        from cytoray.curation.embed import vit_features

        rgb = [images.decode(storage.read_bytes(u, self.storage_cfg), min_side=1).rgb
               for u in batch.column("uri").to_pylist()]
        if self.handcrafted is not None:
            feats = self.handcrafted.embed(rgb).astype(np.float32)
        else:
            feats = vit_features(self.model, rgb, self.size, self.device, self.cls_and_patch)
        return pa.table({"image_id": batch.column("image_id"),
                         "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), feats.shape[1])})


# Part of every cache key: raised whenever the same checkpoint and settings would give other features (2: DINOv2
# hub weights keep their source grid and run-time interpolation), so no stale cache entry is ever reused.
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


def extract_features(spec: str, rows, cfg: ProbeConfig, storage_cfg=None) -> np.ndarray:
    """(N, D) float32 L2-normalised features of ``rows`` (pyarrow table with image_id, uri), in row order."""
    from cytoray import storage
    from cytoray.curation.embed import map_rows_on_actor_pool, standardise

    key = _cache_key(spec, rows, cfg, storage_cfg) if cfg.cache_dir else None
    cache = storage.join_uri(cfg.cache_dir, f"{key}.npz") if key else None
    if cache and storage.exists(cache, storage_cfg):
        return np.load(io.BytesIO(storage.read_bytes(cache, storage_cfg)))["features"]
    ctor = {"spec": spec, "image_size": cfg.image_size, "cls_and_patch": cfg.cls_and_patch,
            "storage_cfg": storage_cfg, "use_gpu": cfg.num_gpus > 0}
    if cfg.num_actors > 0:
        table = map_rows_on_actor_pool(rows, FeatureBatch, ctor, cfg.batch_size, cfg.num_actors, cfg.num_cpus,
                                       cfg.num_gpus, "probe features")
    else:
        import pyarrow as pa

        fb = FeatureBatch(**ctor)
        table = pa.concat_tables([fb(rows.slice(i, cfg.batch_size)) for i in range(0, rows.num_rows, cfg.batch_size)])
    f = np.asarray(table.column("feature").combine_chunks().values, np.float32).reshape(rows.num_rows, -1)
    if spec == "handcrafted":  # very different scales per feature: z-score before unit length
        f = standardise(f)[0]
    else:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    if cache:
        buf = io.BytesIO()
        np.savez(buf, features=f)
        storage.write_bytes(cache, buf.getvalue(), storage_cfg)
    return f


# ------------------------------------------------------------------------------------------ probes


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        recall_score,
    )

    labels = np.arange(len(classes))
    rec = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
            "per_class_recall": {c: float(r) for c, r in zip(classes, rec)},
            "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist()}


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


def linear_probe(x_tr, y_tr, x_te, cfg: ProbeConfig) -> tuple[np.ndarray, float]:
    """Predictions on x_te and the C chosen by inner 3-fold CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=cfg.max_iter))
    inner = min(3, int(np.bincount(y_tr).min()))
    if inner >= 2 and len(cfg.c_grid) > 1:
        gs = GridSearchCV(pipe, {"logisticregression__C": list(cfg.c_grid)}, scoring="balanced_accuracy",
                          cv=StratifiedKFold(inner, shuffle=True, random_state=cfg.seed))
        gs.fit(x_tr, y_tr)
        return gs.predict(x_te), float(gs.best_params_["logisticregression__C"])
    pipe.set_params(logisticregression__C=cfg.c_grid[len(cfg.c_grid) // 2]).fit(x_tr, y_tr)
    return pipe.predict(x_te), float(cfg.c_grid[len(cfg.c_grid) // 2])


def knn_search(x_tr, x_te, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of the k nearest training rows (faiss, exact inner product)."""
    import faiss

    index = faiss.IndexFlatIP(x_tr.shape[1])
    index.add(np.ascontiguousarray(x_tr, np.float32))
    return index.search(np.ascontiguousarray(x_te, np.float32), min(k, len(x_tr)))


def knn_vote(sims: np.ndarray, nbrs: np.ndarray, y_tr, k: int, n_classes: int,
             temperature: float | None) -> np.ndarray:
    """Vote over the first k neighbours (sorted by similarity): uniform (temperature None) or exp(sim / T)."""
    sims, nbrs = sims[:, :k], nbrs[:, :k]
    w = np.ones_like(sims) if temperature is None else np.exp((sims - sims.max(1, keepdims=True)) / temperature)
    votes = np.zeros((len(sims), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(sims)), nbrs.shape[1]), y_tr[nbrs].ravel()), w.ravel())
    return votes.argmax(1)


def knn_predict(x_tr, y_tr, x_te, k: int, n_classes: int, temperature: float | None) -> np.ndarray:
    """Cosine kNN vote with faiss: uniform (temperature None) or exp(sim / T) weights."""
    sims, nbrs = knn_search(x_tr, x_te, k)
    return knn_vote(sims, nbrs, y_tr, k, n_classes, temperature)


def score_features(feats: np.ndarray, labels: list, split_col, cfg: ProbeConfig) -> dict:
    """Linear probe + kNN results on one manifest's features (rows without a label are left out)."""
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
    methods: dict[str, list] = {"linear": []}
    for k in cfg.knn_k:
        methods[f"knn{k}"] = []
    methods[f"knn{cfg.knn_weighted_k}_T{cfg.knn_temperature:g}"] = []
    cs = []
    for tr, te in folds:
        pred, c = linear_probe(x[tr], y[tr], x[te], cfg)
        cs.append(c)
        methods["linear"].append((y[te], pred))
        sims, nbrs = knn_search(x[tr], x[te], max([*cfg.knn_k, cfg.knn_weighted_k]))  # one search, every k
        for k in cfg.knn_k:
            methods[f"knn{k}"].append((y[te], knn_vote(sims, nbrs, y[tr], k, len(classes), None)))
        methods[f"knn{cfg.knn_weighted_k}_T{cfg.knn_temperature:g}"].append(
            (y[te], knn_vote(sims, nbrs, y[tr], cfg.knn_weighted_k, len(classes), cfg.knn_temperature)))
    out = {"protocol": protocol, "folds": len(folds), "images": int(use.sum()), "classes": classes,
           "left_out_classes": dropped, "unlabelled": int((~have).sum()), "chosen_C": cs, "methods": {}}
    for name, parts in methods.items():
        yt = np.concatenate([a for a, _ in parts])
        yp = np.concatenate([b for _, b in parts])
        out["methods"][name] = metrics(yt, yp, classes)
    return out


def confusion_png(result: dict, method: str = "linear") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(result["methods"][method]["confusion"], np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = result["classes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(classes), 0.8 + 0.45 * len(classes)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{method}: balanced acc {result['methods'][method]['balanced_accuracy']:.3f}", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def read_labelled_manifest(uri: str, cfg: ProbeConfig, storage_cfg=None):

    from cytoray import storage

    try:
        table = storage.read_parquet(uri, storage_cfg)
    except FileNotFoundError:
        raise ProbeError(f"labelled manifest {uri} does not exist") from None
    cols = set(table.column_names)
    missing = {"image_id", "uri"} - cols
    has_patients = {"patient_id", cfg.mil_label_column} <= cols
    if not missing and cfg.label_column not in cols and not (cfg.mil and has_patients):
        missing = {cfg.label_column} | ({"patient_id", cfg.mil_label_column} - cols if cfg.mil else set())
    if missing:
        raise ProbeError(f"labelled manifest {uri} lacks columns {sorted(missing)} (has {table.column_names}); "
                         "probe.label_column picks the cell label column; with --mil (probe.mil=true) a manifest "
                         "of patient_id + probe.mil_label_column suffices")
    return table


def _has_cell_labels(table, cfg: ProbeConfig) -> bool:
    col = table.column(cfg.label_column) if cfg.label_column in table.column_names else None
    return col is not None and col.null_count < len(col)


def evaluate(spec: str, manifests: list[str], cfg: ProbeConfig, storage_cfg=None) -> list[dict]:
    """Score one backbone (checkpoint URI, ``random:<arch>`` or ``handcrafted``) on every manifest."""
    results = []
    for uri in manifests:
        table = read_labelled_manifest(uri, cfg, storage_cfg)
        cells = _has_cell_labels(table, cfg)
        patients = cfg.mil and {"patient_id", cfg.mil_label_column} <= set(table.column_names)
        if not cells and not patients:
            raise ProbeError(f"{uri}: column {cfg.label_column!r} has no labels; set probe.label_column, or pass "
                             "--mil (probe.mil=true) with patient_id + probe.mil_label_column for ABMIL only")
        feats = extract_features(spec, table.select(["image_id", "uri"]), cfg, storage_cfg)
        res = {"methods": {}, "protocol": "-", "images": table.num_rows}
        if cells:  # a MIL-only manifest (patient labels, unlabelled cells) skips the cell-level probe
            split_col = table.column("split").to_pylist() if "split" in table.column_names else None
            res = score_features(feats, table.column(cfg.label_column).to_pylist(), split_col, cfg)
        res.update({"checkpoint": spec, "manifest": uri, "feature_dim": int(feats.shape[1])})
        if patients:
            from cytoray.platform.mil import MILConfig, evaluate_mil

            res["mil"] = evaluate_mil(feats, table.column("patient_id").to_pylist(),
                                      table.column(cfg.mil_label_column).to_pylist(),
                                      MILConfig(folds=cfg.mil_folds, epochs=cfg.mil_epochs, seed=cfg.seed))
        results.append(res)
    return results


def results_table(results: list[dict]) -> str:
    """A DinoBloom-style text table: one row per (checkpoint, manifest), columns per method and metric."""
    lines = []
    header = f"{'checkpoint':40s} {'manifest':28s} {'protocol':8s} {'method':14s} {'acc':>6s} {'bal.acc':>7s} {'wF1':>6s}"
    lines.append(header)
    lines.append("-" * len(header))
    for r in results:
        name = r["checkpoint"] if len(r["checkpoint"]) <= 40 else "…" + r["checkpoint"][-39:]
        man = os.path.basename(os.path.dirname(r["manifest"])) + "/" + os.path.basename(r["manifest"])
        man = man if len(man) <= 28 else "…" + man[-27:]
        for m, v in r["methods"].items():
            lines.append(f"{name:40s} {man:28s} {r['protocol']:8s} {m:14s} {v['accuracy']:6.3f} "
                         f"{v['balanced_accuracy']:7.3f} {v['weighted_f1']:6.3f}")
        if "mil" in r:
            v = r["mil"]
            lines.append(f"{name:40s} {man:28s} {'patient':8s} {'ABMIL':14s} {v['accuracy']:6.3f} "
                         f"{v['balanced_accuracy']:7.3f} {v['weighted_f1']:6.3f}")
    return "\n".join(lines)


def config_dict(cfg: ProbeConfig) -> dict:
    return asdict(cfg)


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

    from cytoray import config, storage
    from cytoray.runtime import init_ray, setup_logging

    ap = argparse.ArgumentParser(description="linear probe + kNN scores of checkpoints on labelled manifests")
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="checkpoint URI, random:<arch> or handcrafted (repeatable)")
    ap.add_argument("--manifest", action="append", required=True, help="labelled manifest URI (repeatable)")
    ap.add_argument("--out", default=None, help="directory for results.json and confusion matrices")
    ap.add_argument("--mil", action="store_true", help="also run patient-level ABMIL where patient labels exist")
    args, rest = ap.parse_known_args(argv)
    files, overrides = config.split_cli(rest)
    cfg = config.load_config(ProbeSettings, files[0] if files else None, files[1:], overrides)
    cfg = config.to_object(cfg)
    if args.mil:
        cfg.probe.mil = True
    setup_logging(cfg.log_level)
    init_ray(cfg.ray)
    results = run_probe(args.checkpoint, args.manifest, cfg.probe, args.out, cfg.storage)
    print(results_table(results))
    if args.out:
        print(f"results: {storage.join_uri(args.out, 'results.json')}")
    return results
