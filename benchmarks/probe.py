"""Probe cost: ViT-S/14 feature extraction images/s (in-process loop vs the Ray Data actor pool the probe uses;
CUDA too when a GPU is visible) and the linear-probe + kNN time on N × 384 features.

    python benchmarks/probe.py                          # 512 images; 100,000 × 384 features
    python benchmarks/probe.py --images 128 --features 20000

Features for the probe part are synthetic (``--classes`` Gaussian clusters on the unit sphere, 80/20 fixed
split, the ``fixed`` protocol): the timing depends on N, D and the class count, not on where features came
from. Baselines in the same process: the extraction loop in one process (decode + resize + forward, torch on
all cores) for the actor pool; scikit-learn's brute-force cosine ``NearestNeighbors`` for faiss's kNN.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synthetic_cells(directory: str, n: int):
    import pyarrow.parquet as pq

    from cytoray.testing import write_cell_manifest

    return pq.read_table(write_cell_manifest(directory, n, seed=0)).select(["image_id", "uri"])


def extraction(n_images: int, actors: int) -> list[tuple[str, int, float]]:
    import ray
    import torch

    from cytoray import images, storage
    from cytoray.eval.probe import ProbeConfig, extract_features
    from cytoray.features.backbone import vit_features
    from cytoray.features.preprocess import Preprocess
    from cytoray.platform.models.checkpoints import export_dinobloom
    from cytoray.platform.models.vit import build_vit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = synthetic_cells(os.path.join(tmp, "cells"), n_images)
        model = build_vit(arch="vit_small", patch_size=14, img_size=224).eval()
        ckpt = os.path.join(tmp, "vits.pth")
        export_dinobloom(model, ckpt)
        uris = table.column("uri").to_pylist()

        def loop(device: str) -> float:
            m = model.to(device)
            t0 = time.perf_counter()
            for i in range(0, len(uris), 64):
                rgb = [images.decode(storage.read_bytes(u), min_side=1).rgb for u in uris[i:i + 64]]
                vit_features(m, rgb, Preprocess(224), device)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        loop("cpu") if n_images <= 64 else None  # warm-up (allocator, kernels)
        rows.append((f"in-process loop, CPU, torch {torch.get_num_threads()} threads", n_images, loop("cpu")))
        if torch.cuda.is_available():
            loop("cuda")
            rows.append((f"in-process loop, {torch.cuda.get_device_name()}", n_images, loop("cuda")))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        cfg = ProbeConfig(num_actors=actors, num_cpus=max(0.5, (os.cpu_count() or 2) / actors - 0.01), batch_size=64)
        for label in ("first run", "warm"):
            t0 = time.perf_counter()
            extract_features(ckpt, table, cfg)
            rows.append((f"Ray Data actor pool ({actors} actors), {label}", n_images, time.perf_counter() - t0))
        ray.shutdown()
    return rows


def probe_time(n: int, dim: int, classes: int, seed: int = 0) -> list[tuple[str, float, str]]:
    from sklearn.neighbors import NearestNeighbors

    from cytoray.eval.methods import knn_search, knn_vote, linear_probe
    from cytoray.eval.metrics import metrics
    from cytoray.eval.probe import ProbeConfig

    rng = np.random.default_rng(seed)
    centres = 0.1 * rng.normal(size=(classes, dim))  # overlapping classes: a probe that has work to do
    y = rng.integers(0, classes, n)
    x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cut = int(0.8 * n)
    xtr, ytr, xte, yte = x[:cut], y[:cut], x[cut:], y[cut:]
    names = [str(c) for c in range(classes)]
    out = []
    cfg = ProbeConfig()
    t0 = time.perf_counter()
    sims, nbrs = knn_search(xtr, xte, max([*cfg.knn_k, cfg.knn_weighted_k]))  # one search serves every k
    for k in cfg.knn_k:
        knn_vote(sims, nbrs, ytr, k, classes, None)
    pred = knn_vote(sims, nbrs, ytr, cfg.knn_weighted_k, classes, cfg.knn_temperature)
    t_knn = time.perf_counter() - t0
    out.append(("kNN (faiss, one search): k=1, k=20, k=20 T=0.07", t_knn,
                f"k=20 T=0.07 bal.acc {metrics(yte, pred, names)['balanced_accuracy']:.3f}"))
    t0 = time.perf_counter()
    NearestNeighbors(n_neighbors=20, metric="cosine", algorithm="brute").fit(xtr).kneighbors(xte)
    t_sk = time.perf_counter() - t0
    out.append(("kNN baseline: sklearn brute cosine, one k=20 search", t_sk, f"faiss path {t_sk / t_knn:.1f}x faster"))
    t0 = time.perf_counter()
    pred, c = linear_probe(xtr, ytr, xte, ProbeConfig(c_grid=[1.0]))
    out.append(("linear probe, one C (lbfgs, multinomial)", time.perf_counter() - t0,
                f"bal.acc {metrics(yte, pred, names)['balanced_accuracy']:.3f}"))
    t0 = time.perf_counter()
    pred, c = linear_probe(xtr, ytr, xte, cfg)
    out.append((f"linear probe, C from {list(cfg.c_grid)} by inner 3-fold CV", time.perf_counter() - t0,
                f"C={c:g}, bal.acc {metrics(yte, pred, names)['balanced_accuracy']:.3f}"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--features", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--skip-extraction", action="store_true")
    args = ap.parse_args(argv)
    if not args.skip_extraction:
        rows = extraction(args.images, args.actors)
        base = rows[0][1] / rows[0][2]
        print(f"\nViT-S/14 feature extraction at 224 px (decode + resize + forward), {args.images} synthetic cells")
        print(f"{'run':58s} {'images':>7s} {'wall s':>8s} {'img/s':>8s} {'vs loop':>8s}")
        for name, n, t in rows:
            print(f"{name:58s} {n:7d} {t:8.2f} {n / t:8.1f} {n / t / base:7.2f}x")
    print(f"\nprobe on {args.features:,} x {args.dim} features, {args.classes} classes, fixed 80/20 split")
    total = 0.0
    for name, t, note in probe_time(args.features, args.dim, args.classes):
        print(f"{name:58s} {t:8.1f} s  {note}")
        total += t if "baseline" not in name and "one C" not in name else 0.0
    print(f"{'probe as run per checkpoint (kNN x3 + CV linear probe)':58s} {total:8.1f} s")


if __name__ == "__main__":
    main()
