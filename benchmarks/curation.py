"""Curation at scale: near-duplicate detection + 2-level hierarchical k-means + balanced sampling on N × D
float32 embeddings with planted duplicates, against scikit-learn (NearestNeighbors + MiniBatchKMeans) on the
same data in the same process; plus the handcrafted embedder's images/s per core.

    python benchmarks/curation.py                      # 1,000,000 × 384 (the issue's setting)
    python benchmarks/curation.py --n 100000 --baseline-queries 5000

The baseline would run for hours at 1M (brute-force kNN is N² · D), so it is measured on a subsample and
extrapolated, and the output says so: NearestNeighbors answers ``--baseline-queries`` queries against the
full index (cost ∝ queries, scaled up to N); MiniBatchKMeans runs on ``--baseline-kmeans`` rows (its cost per
pass ∝ rows, scaled up to N).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def make_embeddings(n: int, d: int, dup_fraction: float, seed: int):
    """Skewed mixture (a few large 'datasets', many small modes) + planted near-duplicates (tiny noise)."""
    rng = np.random.default_rng(seed)
    modes = 2000
    weights = rng.pareto(1.2, modes) + 0.05
    centres = rng.normal(size=(modes, d)).astype(np.float32)
    which = rng.choice(modes, n, p=weights / weights.sum())
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):
        b = min(n, a + 100_000)
        x[a:b] = centres[which[a:b]] + 1.2 * rng.standard_normal((b - a, d), dtype=np.float32)
    n_dup = int(n * dup_fraction)
    idx = rng.choice(n, 2 * n_dup, replace=False)
    src, dst = idx[:n_dup], idx[n_dup:]
    x[dst] = x[src] + 0.05 * rng.standard_normal((n_dup, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    group = (which % 13).astype(np.int64)  # 13 'datasets' of very different sizes
    return x, {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())}, group


def cytoray_pipeline(x, group, threshold, levels, target):
    from cytoray.curation.balance import hierarchical_sample
    from cytoray.curation.cluster import ClusterConfig, hierarchical_kmeans
    from cytoray.curation.dedup import DedupConfig, partitioned_edges, select_representatives

    t = {}
    t0 = time.perf_counter()
    i, j, s = partitioned_edges(x, threshold, DedupConfig(), k=8)
    keep, _, _ = select_representatives(np.arange(len(x)), i, j, s)  # keep order: the lower index first
    t["near-duplicates"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    kept = np.flatnonzero(keep)
    h = hierarchical_kmeans(x[kept], ClusterConfig(levels=levels, resample_steps=3, use_gpu=False))
    t["hierarchical k-means"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    keys = [group[kept]] + [h.labels[:, lv] for lv in range(h.labels.shape[1] - 1, -1, -1)]
    reps = hierarchical_sample(keys, np.ones(len(kept)), target, max_repeat=4, seed=0)
    t["balanced sampling"] = time.perf_counter() - t2
    return t, (i, j), keep, h, reps


def sklearn_baseline(x, levels, queries: int, kmeans_rows: int, seed: int = 0):
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from sklearn.neighbors import NearestNeighbors

    n = len(x)
    rng = np.random.default_rng(seed)
    q = rng.choice(n, min(n, queries), replace=False)
    t0 = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=9, algorithm="brute", metric="cosine").fit(x)
    nn.kneighbors(x[q])
    nn_s = (time.perf_counter() - t0) * n / len(q)
    rows = rng.choice(n, min(n, kmeans_rows), replace=False)
    t1 = time.perf_counter()
    mbk = MiniBatchKMeans(n_clusters=min(levels[0], len(rows) // 5), batch_size=4096, n_init=1, random_state=seed)
    mbk.fit(x[rows])
    KMeans(n_clusters=min(levels[1], mbk.cluster_centers_.shape[0] // 5), n_init=1,
           random_state=seed).fit(mbk.cluster_centers_)
    km_s = (time.perf_counter() - t1) * n / len(rows)
    return {"kNN (extrapolated)": nn_s, "k-means (extrapolated)": km_s}


def handcrafted_rate(images: int = 300, size: int = 96) -> float:
    """Images/s of the handcrafted embedder in one process (= per core)."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell

    rng = np.random.default_rng(0)
    imgs = [render_cell(CLASS_NAMES[i % 10], size, 0.3, Stain(), rng) for i in range(images)]
    from cytoray.features.handcrafted import handcrafted_batch

    handcrafted_batch(imgs[:10])
    t0 = time.perf_counter()
    handcrafted_batch(imgs)
    return images / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--dup-fraction", type=float, default=0.01)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--levels", type=int, nargs=2, default=[1000, 100])
    ap.add_argument("--baseline-queries", type=int, default=5000)
    ap.add_argument("--baseline-kmeans", type=int, default=100_000)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args(argv)

    import faiss

    print(f"machine: {os.cpu_count()} CPUs; faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads")
    t0 = time.perf_counter()
    x, planted, group = make_embeddings(args.n, args.dim, args.dup_fraction, seed=0)
    print(f"data: {args.n:,} × {args.dim} float32 ({x.nbytes / 2**30:.2f} GiB), {len(planted):,} planted "
          f"near-duplicate pairs, made in {time.perf_counter() - t0:.1f}s")
    with PeakRSS() as mem:
        t_start = time.perf_counter()
        times, (i, j), keep, h, reps = cytoray_pipeline(x, group, args.threshold, args.levels, target=args.n // 2)
        total = time.perf_counter() - t_start
    found = {(min(a, b), max(a, b)) for a, b in zip(i.tolist(), j.tolist())}
    recall = len(found & planted) / max(1, len(planted))
    precision = len(found & planted) / max(1, len(found))
    for k, v in times.items():
        print(f"  cytoray {k:24s} {v:8.1f}s")
    print(f"cytoray end to end: {total:.1f}s ({total / 60:.2f} min), peak RSS {mem.peak / 2**30:.2f} GiB "
          f"(incl. the {x.nbytes / 2**30:.2f} GiB input); removed {int((~keep).sum()):,}; planted pairs "
          f"recall {recall:.3f}, precision {precision:.3f} at cosine > {args.threshold}; levels {h.levels}; "
          f"sampled {int((reps > 0).sum()):,} images for {int(reps.sum()):,} samples")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  (ru_maxrss so far {rss:.2f} GiB)")
    if not args.skip_baseline:
        base = sklearn_baseline(x, args.levels, args.baseline_queries, args.baseline_kmeans)
        base_total = sum(base.values())
        for k, v in base.items():
            print(f"  sklearn {k:24s} {v:8.1f}s")
        print(f"sklearn baseline (NearestNeighbors brute on {args.baseline_queries:,} queries against all "
              f"{args.n:,}, MiniBatchKMeans on {args.baseline_kmeans:,} rows; both scaled to {args.n:,}): "
              f"{base_total:.0f}s")
        print(f"ratio sklearn / cytoray: {base_total / total:.1f}x  (kNN part "
              f"{base['kNN (extrapolated)'] / times['near-duplicates']:.1f}x, k-means part "
              f"{base['k-means (extrapolated)'] / times['hierarchical k-means']:.1f}x)")
    rate = handcrafted_rate()
    print(f"handcrafted embedder: {rate:.0f} images/s per core (96×96 synthetic cells, one process)")


if __name__ == "__main__":
    main()
