"""Curation stages at scale: the pipeline's own dedup -> cluster -> balance on a run directory holding what
ingest and embed write (``ingested.parquet``; ``embeddings.parquet`` with embeddings and uint8 fingerprints;
their ``_stages`` markers), with planted copies whose ground truth is known.

    python benchmarks/curation.py                                   # 100,000 images
    python benchmarks/curation.py --images 10000 --baseline-images 10000

Images are synthetic cells (``synthetic.cells.render_cell``, 64 px, one stain per dataset) fingerprinted as the
embed stage does (``features.fingerprint``); about ``--copy-rate`` of them are planted copies of another image —
exact pixels, JPEG re-encoded, flipped, rotated 90°, cropped 3–8% and resized back, downscaled, recoloured —
40% of them in another dataset. Embeddings (``--dim``) are a skewed mixture (2,000 Pareto-weighted modes) and
a copy's embedding is its source's plus a little noise; 13 datasets of very different sizes.

Prints per stage: wall time and peak RSS of this process (sampled); planted-pair precision and recall of
``duplicates.parquet``, per kind of copy; the leakage guard's search against ``--eval-images`` of the originals
(time, planted copies flagged). Baseline in the same process: the fingerprint search as it was before
issue 15 (faiss flat kNN per query variant, a dict per match) against the current one on the first
``--baseline-images`` images, with the pairs each finds.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("exact", "reencode", "flip", "rot90", "crop", "resize", "recolour")
SIZE = 64  # rendered cell side, px
DATASETS = 13


class PeakRSS:
    """Samples this process's resident memory every 50 ms (ru_maxrss never goes down between phases)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def _copy_pixels(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    from cytoray.curation.synthetic.collection import _transform

    if kind == "exact":
        return img
    if kind == "reencode":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(70, 95)))
        return np.asarray(Image.open(buf).convert("RGB"))
    return np.ascontiguousarray(_transform(img, kind, rng))


def _render_chunk(args):
    """Fingerprints (uint8) of originals [start, stop) and of the copies of them: (originals, copies, copy sizes)."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell
    from cytoray.features.fingerprint import fingerprint_u8

    seed, start, stop, classes, stains, copies = args
    rng = np.random.default_rng([seed, start])
    cells = [render_cell(CLASS_NAMES[c], SIZE, 0.3, Stain(*stains[i]), rng)
             for i, c in zip(range(start, stop), classes)]
    originals = np.stack([fingerprint_u8(im) for im in cells])
    out, sizes = [], []
    for src, kind in copies:
        im = _copy_pixels(cells[src - start], kind, rng)
        out.append(fingerprint_u8(im))
        sizes.append(im.shape[:2])
    copies_fp = np.stack(out) if out else np.zeros((0,) + originals.shape[1:], np.uint8)
    return originals, copies_fp, sizes


def make_collection(n: int, dim: int, copy_rate: float, seed: int, workers: int):
    """(ingested table, embeddings table, ground truth frame), rows in image_id order."""
    import pandas as pd
    import pyarrow as pa

    from cytoray.curation.synthetic.cells import CLASS_NAMES
    from cytoray.manifest import MANIFEST_SCHEMA
    from cytoray.tables import pack_vectors

    rng = np.random.default_rng(seed)
    n_copies = int(n * copy_rate)
    n_orig = n - n_copies
    share = rng.pareto(1.0, DATASETS) + 0.1
    dataset = rng.choice(DATASETS, n_orig, p=share / share.sum())
    cls = rng.integers(0, len(CLASS_NAMES), n_orig)
    stain_of = rng.uniform([0.8, 0.8, 0.8, -0.15, 0.02], [1.2, 1.2, 1.2, 0.15, 0.06], (DATASETS, 5))
    stains = stain_of[dataset]
    src = np.sort(rng.choice(n_orig, n_copies, replace=False))
    kind = rng.integers(0, len(KINDS), n_copies)
    copy_ds = np.where(rng.random(n_copies) < 0.4, rng.integers(0, DATASETS, n_copies), dataset[src])
    chunk = 2000
    jobs = []
    for a in range(0, n_orig, chunk):
        b = min(n_orig, a + chunk)
        lo, hi = np.searchsorted(src, [a, b])
        jobs.append((seed, a, b, cls[a:b].tolist(), {i: stains[i].tolist() for i in range(a, b)},
                     [(int(s), KINDS[k]) for s, k in zip(src[lo:hi], kind[lo:hi])]))
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(_render_chunk, jobs))
    fp = np.concatenate([p[0] for p in parts] + [p[1] for p in parts])  # originals, then copies (in src order)
    hw = np.array([(SIZE, SIZE)] * n_orig + [s for p in parts for s in p[2]], np.int32).reshape(-1, 2)

    # embeddings: skewed mixture; a copy = its source + noise
    modes = 2000
    weights = rng.pareto(1.2, modes) + 0.05
    centres = rng.normal(size=(modes, dim)).astype(np.float32)
    which = rng.choice(modes, n_orig, p=weights / weights.sum())
    emb = np.empty((n, dim), np.float32)
    for a in range(0, n_orig, 100_000):
        b = min(n_orig, a + 100_000)
        emb[a:b] = centres[which[a:b]] + 1.2 * rng.standard_normal((b - a, dim), dtype=np.float32)
    emb[n_orig:] = emb[src] + 0.05 * rng.standard_normal((n_copies, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    ds = np.concatenate([dataset, copy_ds])
    labelled = ds % 3 != 0  # a third of the datasets carry no labels
    ids = np.array([f"ds{d:02d}/{i:08d}" for i, d in enumerate(ds)], dtype=object)
    pixel = np.array([f"px{i:08d}" for i in range(n)], dtype=object)
    pixel[n_orig:][kind == KINDS.index("exact")] = pixel[src[kind == KINDS.index("exact")]]
    cell = np.array([CLASS_NAMES[c] for c in np.concatenate([cls, cls[src]])], dtype=object)
    order = np.argsort(ids)
    cols = {"image_id": ids, "uri": np.array([f"synthetic://{i}" for i in ids], dtype=object),
            "dataset": np.array([f"ds{d:02d}" for d in ds], dtype=object),
            "modality": np.where(ds % 4 == 0, "bone_marrow", "peripheral_blood").astype(object),
            "cell_type": np.where(labelled, cell, None), "width": hw[:, 1], "height": hw[:, 0],
            "pixel_sha256": pixel}
    ingested = pa.table({f.name: pa.array(cols[f.name][order], f.type) if f.name in cols else pa.nulls(n, f.type)
                         for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
    embeddings = pa.table({"image_id": pa.array(ids[order], pa.string()), "embedding": pack_vectors(emb[order]),
                           "fingerprint": pack_vectors(fp.reshape(n, -1)[order])})
    truth = pd.DataFrame({"image_id": ids, "kind": ["original"] * n_orig + [
        "exact_duplicate" if KINDS[k] == "exact" else "near_duplicate" for k in kind],
        "duplicate_of": [None] * n_orig + ids[src].tolist(),
        "transform": [None] * n_orig + [KINDS[k] for k in kind], "dataset": ds})
    return ingested, embeddings, truth


def write_run(out: str, ingested, embeddings, settings: dict) -> None:
    """The ingest and embed stages' outputs and markers (``stage.run_stage``), as those stages write them."""
    from cytoray.curation.stage import run_stage

    def ingest(run):
        run.publish("ingested.parquet", ingested)
        return {"stage": "ingest", "images": ingested.num_rows}

    def embed(run):
        run.publish("embeddings.parquet", embeddings, sort=False)  # manifest order
        return {"stage": "embed", "embedder": "synthetic", "count": embeddings.num_rows,
                "dim": len(embeddings.column("embedding")[0])}

    run_stage("ingest", out, settings, ingest, force=True)
    run_stage("embed", out, settings, embed, force=True)


def legacy_dihedral_knn_edges(thumbs: np.ndarray, k: int, threshold: float):
    """The fingerprint search before issue 15 on float32 thumbnails with their means removed: a faiss flat index
    of the zoom-1 thumbnails, one kNN search per query variant (zoom × flip × rotation) and a Python dict over
    every match."""
    import faiss

    def unit(x):
        x = x.reshape(len(x), -1).astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)

    index = faiss.IndexFlatIP(thumbs.shape[-1] ** 2)
    index.add(unit(thumbs[:, 0]))
    best: dict[tuple[int, int], float] = {}
    for z in range(thumbs.shape[1]):
        for flip in (False, True):
            for rot in range(4):
                t = thumbs[:, z, :, ::-1] if flip else thumbs[:, z]
                sims, nbrs = index.search(unit(np.rot90(t, rot, axes=(1, 2))), k + 1)
                rows = np.repeat(np.arange(len(t)), nbrs.shape[1])
                cols, s = nbrs.ravel(), sims.ravel()
                ok = (cols >= 0) & (s > threshold) & (cols != rows)
                for i, j, v in zip(rows[ok].tolist(), cols[ok].tolist(), s[ok].tolist()):
                    key = (min(i, j), max(i, j))
                    best[key] = max(best.get(key, -1.0), v)
    return best


def baseline(out: str, rows: int) -> None:
    """Old vs current fingerprint search on the first ``rows`` images of the run, same process."""
    from cytoray.curation.dedup import DedupConfig, dihedral_knn_edges
    from cytoray.curation.embed import load_embeddings
    from cytoray.features.fingerprint import fingerprints_from_u8

    thumbs = load_embeddings(out)[2][:rows]
    cfg = DedupConfig()
    t0 = time.perf_counter()
    old = legacy_dihedral_knn_edges(fingerprints_from_u8(thumbs), cfg.k, cfg.threshold)  # float32, as it was
    t_old = time.perf_counter() - t0
    t1 = time.perf_counter()
    i, j, s = dihedral_knn_edges(thumbs, cfg.k, cfg.threshold, cfg)
    t_new = time.perf_counter() - t1
    new = dict(zip(zip(i.tolist(), j.tolist()), s.tolist()))
    both = set(old) & set(new)
    diff = max((abs(old[p] - new[p]) for p in both), default=0.0)
    mode = "exact" if rows <= cfg.flat_max else f"partitioned, lists of ~{cfg.list_size}, {cfg.list_probe} probed"
    print(f"fingerprint search on {rows:,} images: before issue 15 {t_old:.1f}s, now {t_new:.1f}s ({mode}): "
          f"{t_old / t_new:.1f}x; pairs {len(old):,} before, {len(new):,} now, {len(both):,} in both "
          f"(max |Δ cosine| {diff:.1e})")


def leakage(out: str, truth, n_eval: int, seed: int) -> None:
    """The leakage guard's search (``dedup.cross_edges``) of every image against ``n_eval`` originals as an
    evaluation set: time, and how many planted copies of those originals it flags."""
    from cytoray.curation.dedup import DedupConfig, cross_edges
    from cytoray.curation.embed import load_embeddings

    ids, _, thumbs = load_embeddings(out)
    row = {k: r for r, k in enumerate(ids)}
    originals = truth.image_id[truth.kind == "original"].to_numpy()
    chosen = np.random.default_rng(seed).choice(originals, min(n_eval, len(originals)), replace=False)
    evals = np.array([row[k] for k in chosen])
    cfg = DedupConfig()
    t0 = time.perf_counter()
    t, e, _ = cross_edges(thumbs, thumbs[evals], cfg.k, cfg.leakage_threshold, cfg)
    dt = time.perf_counter() - t0
    found = set(zip(t.tolist(), evals[e].tolist()))
    copies = truth[truth.duplicate_of.isin(set(chosen))]
    planted = {(row[c], row[o]) for c, o in zip(copies.image_id, copies.duplicate_of)}
    print(f"leakage guard search, {len(ids):,} images against {len(evals):,} evaluation images (both ways): "
          f"{dt:.1f}s; planted copies of evaluation images flagged {len(planted & found)}/{len(planted)}; "
          f"{len(set(t.tolist())):,} images flagged (incl. the evaluation images themselves)")


def score(out: str, truth) -> None:
    from cytoray.curation.synthetic.scoring import dedup_precision_recall
    from cytoray.tables import read_table

    dups = read_table(os.path.join(out, "duplicates.parquet")).to_pylist()
    total = dedup_precision_recall(dups, truth)
    per = {t: dedup_precision_recall(dups, truth[truth["transform"].isin([t]) | (truth.kind == "original")])["recall"]
           for t in KINDS}
    copies = truth[truth.kind != "original"]
    src_ds = dict(zip(truth.image_id, truth.dataset))
    across = copies[[src_ds[d] != s for d, s in zip(copies.duplicate_of, copies.dataset)]]
    cross = dedup_precision_recall(dups, truth[truth.image_id.isin(across.image_id) | (truth.kind == "original")])
    print(f"planted pairs: {total['planted']:,}; duplicates reported {total['reported']:,}; precision "
          f"{total['precision']:.4f}, recall {total['recall']:.4f} (across datasets {cross['recall']:.4f}); "
          "recall by kind: " + ", ".join(f"{t} {r:.3f}" for t, r in per.items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--copy-rate", type=float, default=0.05)
    ap.add_argument("--baseline-images", type=int, default=5000, help="0: no baseline")
    ap.add_argument("--eval-images", type=int, default=1000, help="leakage guard search; 0: skip it")
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import faiss

    from cytoray.curation.balance import BalanceConfig, run_balance
    from cytoray.curation.cluster import ClusterConfig, run_cluster
    from cytoray.curation.dedup import DedupConfig, run_dedup

    print(f"machine: {os.cpu_count()} CPUs; faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads")
    out = args.out or tempfile.mkdtemp(prefix="cytoray-bench-")
    t0 = time.perf_counter()
    ingested, embeddings, truth = make_collection(args.images, args.dim, args.copy_rate, args.seed, args.workers)
    write_run(out, ingested, embeddings, {"benchmark": vars(args)})
    del ingested, embeddings
    print(f"data: {args.images:,} images ({(truth.kind != 'original').sum():,} planted copies, {DATASETS} datasets), "
          f"fingerprints + {args.dim}-d embeddings, rendered and written to {out} in {time.perf_counter() - t0:.1f}s")
    dedup_cfg = DedupConfig()
    stages = (("dedup", lambda: run_dedup(out, dedup_cfg, force=True)),
              ("cluster", lambda: run_cluster(out, ClusterConfig(use_gpu=False), force=True)),
              ("balance", lambda: run_balance(out, BalanceConfig(), force=True)))
    total = 0.0
    with PeakRSS() as overall:
        for name, run in stages:
            with PeakRSS() as mem:
                t = time.perf_counter()
                summary = run()
                dt = time.perf_counter() - t
            total += dt
            detail = {"dedup": lambda s: f"{s['total']['kept']:,} kept, {s['total']['exact']:,} exact, "
                                         f"{s['total']['near']:,} near",
                      "cluster": lambda s: f"levels {s['levels']}",
                      "balance": lambda s: f"{s['sampled_images']:,} images for {s['samples_per_epoch']:,} samples"}
            print(f"  {name:8s} {dt:8.1f}s  peak RSS {mem.peak / 2**30:5.2f} GiB  ({detail[name](summary)})")
    print(f"dedup -> cluster -> balance: {total:.1f}s ({total / 60:.2f} min), peak RSS {overall.peak / 2**30:.2f} GiB; "
          f"dedup: {'exact' if args.images <= dedup_cfg.flat_max else 'partitioned'} fingerprint search")
    score(out, truth)
    if args.eval_images:
        leakage(out, truth, args.eval_images, args.seed)
    if args.baseline_images:
        baseline(out, min(args.baseline_images, args.images))


if __name__ == "__main__":
    main()
