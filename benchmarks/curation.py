"""Curation stages at scale: the pipeline's own dedup -> cluster -> balance on a run directory holding what
ingest and embed write (``ingested.parquet``; ``embeddings.parquet`` with embeddings and uint8 fingerprints;
their ``_stages`` markers), with planted copies whose ground truth is known.

    python benchmarks/curation.py                                   # 100,000 images
    python benchmarks/curation.py --images 10000 --baseline-images 10000
    # 5M: write the stage files once (resumable), then time the stages on them
    python benchmarks/curation.py --images 5000000 --out /tmp/bench5m --resume --stages ''
    python benchmarks/curation.py --images 5000000 --out /tmp/bench5m --reuse --eval-images 0 --baseline-images 0

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
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cytoray.curation.dedup import ROUTINGS  # noqa: E402
from cytoray.curation.synthetic.planted import DATASETS, KINDS, write_planted_run  # noqa: E402


class PeakRSS:
    """Samples resident memory every 50 ms (ru_maxrss never goes down between phases): this process (the driver)
    and, separately, the largest single Ray process (workers, raylet, GCS; their RSS counts the object-store
    pages they touch) and all Ray processes together."""

    def __init__(self):
        import psutil

        self.psutil, self.proc, self._stop = psutil, psutil.Process(), threading.Event()
        self.peak = self.ray_peak = self.ray_total = 0

    def _ray_rss(self) -> list[int]:
        out = []
        for p in self.psutil.process_iter(["pid", "name", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
                if p.info["pid"] != self.proc.pid and ("ray::" in cmd or "/ray/" in cmd or p.info["name"] in (
                        "raylet", "gcs_server", "plasma_store")):
                    out.append(p.memory_info().rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return out

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        tick = 0
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)
            tick += 1
            if tick % 10 == 0:  # Ray processes every 0.5 s (listing processes costs more)
                rss = self._ray_rss()
                self.ray_peak = max([self.ray_peak] + rss)
                self.ray_total = max(self.ray_total, sum(rss))

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def line(self) -> str:
        g = 2 ** 30
        return (f"driver peak RSS {self.peak / g:5.2f} GiB, largest Ray process {self.ray_peak / g:5.2f} GiB, "
                f"all Ray processes {self.ray_total / g:5.2f} GiB")


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
    from cytoray.curation.dedup import DedupConfig, dihedral_knn_edges, list_count
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
    lists = list_count(rows, cfg)
    mode = "exact" if lists == 1 else f"partitioned, lists of ~{rows // lists}, {cfg.list_probe} probed"
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


def reference(out: str, dedup_cfg, cluster_cfg, recall_queries: int, seed: int, stages: list[str]) -> None:
    """The stages' results against the single-process, in-memory algorithms on the whole arrays: dedup's
    decisions (``dedup.deduplicate``), cluster labels (adjusted Rand index against ``hierarchical_kmeans``), and
    the partitioned search's recall against the exact search for ``recall_queries`` random images; the cluster
    comparison only when ``stages`` ran cluster (its output is from the same dedup run then)."""
    import pandas as pd
    from sklearn.metrics import adjusted_rand_score

    from cytoray.curation import dedup as D
    from cytoray.curation.cluster import hierarchical_kmeans
    from cytoray.curation.embed import load_embeddings
    from cytoray.tables import read_table

    ids, emb, thumbs = load_embeddings(out)
    frame = read_table(os.path.join(out, "ingested.parquet"),
                       columns=["image_id", "pixel_sha256", "cell_type", "width", "height", "dataset"]).to_pandas()
    t0 = time.perf_counter()
    keep, dups = D.deduplicate(frame, None, dedup_cfg, thumbs=thumbs)
    t_dedup = time.perf_counter() - t0
    stage = read_table(os.path.join(out, "duplicates.parquet")).to_pandas()
    ref = set(zip(*(pd.DataFrame(dups)[c] for c in ("image_id", "duplicate_of", "reason")))) if dups else set()
    got = set(zip(stage.image_id, stage.duplicate_of, stage.reason))
    print(f"reference dedup (in memory, one process): {t_dedup:.1f}s; {len(ref):,} duplicates, the stage "
          f"{len(got):,}, identical: {ref == got} ({len(ref & got):,} in both)")
    if "cluster" in stages:
        x = emb[keep] / np.linalg.norm(emb[keep], axis=1, keepdims=True)
        t0 = time.perf_counter()
        h = hierarchical_kmeans(x, cluster_cfg)
        t_cluster = time.perf_counter() - t0
        clusters = read_table(os.path.join(out, "clusters.parquet"))
        aris = [adjusted_rand_score(h.labels[:, t], clusters.column(c).to_numpy())
                for t, c in enumerate(h.column_names())]
        print(f"reference cluster (in memory): {t_cluster:.1f}s; adjusted Rand index per level (finest first) "
              + ", ".join(f"{a:.4f}" for a in aris))
    if recall_queries and len(thumbs) > dedup_cfg.flat_max:
        rng = np.random.default_rng(seed)
        q = np.sort(rng.choice(len(thumbs), min(recall_queries, len(thumbs)), replace=False))
        exact_cfg = D.DedupConfig(flat_max=len(thumbs) + 1)
        t0 = time.perf_counter()
        qi, mi, _ = D._dihedral_search(thumbs[q], thumbs, dedup_cfg.k, dedup_cfg.threshold, exact_cfg, same=False)
        t_exact = time.perf_counter() - t0
        own = q[qi] != mi
        exact_pairs = {(min(a, b), max(a, b)) for a, b in zip(q[qi][own].tolist(), mi[own].tolist())}
        a, b, _ = D.dihedral_knn_edges(thumbs, dedup_cfg.k, dedup_cfg.threshold, dedup_cfg)
        part = set(zip(a.tolist(), b.tolist()))
        found = len(exact_pairs & part)
        print(f"partitioned vs exact search, {len(q):,} random query images against all {len(thumbs):,}: exact "
              f"finds {len(exact_pairs):,} pairs ({t_exact:.1f}s), the partitioned search {found:,} of them: recall "
              f"{found / max(1, len(exact_pairs)):.4f}")


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
    ap.add_argument("--scale", choices=("ray", "local"), default="ray",
                    help="stages as Ray tasks over shards (default) or in this process")
    ap.add_argument("--shard-rows", type=int, default=32_768)
    ap.add_argument("--route-pool", type=int, default=None, help="dedup.route_pool (default: the config default)")
    ap.add_argument("--routing", choices=ROUTINGS, default=None,
                    help="dedup.routing (default: the config default)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                    help="compare with the in-memory algorithms (default: up to 200,000 images)")
    ap.add_argument("--recall-queries", type=int, default=2000,
                    help="reference: images whose exact search measures the partitioned search's recall")
    ap.add_argument("--part-rows", type=int, default=32_768, help="rows per part file of the planted stage files")
    ap.add_argument("--resume", action="store_true",
                    help="keep the parts an interrupted run with the same arguments wrote to --out")
    ap.add_argument("--stages", default="dedup,cluster,balance",
                    help="stages to time, in order ('' : only write the planted run)")
    ap.add_argument("--reuse", action="store_true",
                    help="--out holds a planted run of --images images already (truth.parquet): time the stages only")
    args = ap.parse_args(argv)
    if args.reference is None:
        args.reference = args.images <= 200_000

    import logging

    import faiss

    from cytoray.curation.balance import BalanceConfig
    from cytoray.curation.balance_passes import run_balance
    from cytoray.curation.cluster import ClusterConfig, run_cluster
    from cytoray.curation.dedup import DedupConfig
    from cytoray.curation.dedup_stage import run_dedup
    from cytoray.curation.shards import ScaleConfig

    logging.basicConfig(format="    %(message)s")
    logging.getLogger("cytoray.curation.shards").setLevel(logging.INFO)  # one line per pass over the shards
    print(f"machine: {os.cpu_count()} CPUs; faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads")
    out = args.out or tempfile.mkdtemp(prefix="cytoray-bench-")
    t0 = time.perf_counter()
    if args.reuse:
        import pyarrow.parquet as pq

        if not args.out or not os.path.exists(os.path.join(out, "truth.parquet")):
            raise SystemExit(f"--reuse: no planted run in {out!r} (truth.parquet); run once without --reuse")
        truth = pq.read_table(os.path.join(out, "truth.parquet")).to_pandas()
        if len(truth) != args.images:
            raise SystemExit(f"--reuse: {out} holds {len(truth):,} images, not --images {args.images:,}")
        how = "reused"
    else:
        truth = write_planted_run(out, args.images, args.dim, args.copy_rate, args.seed, args.workers, args.part_rows,
                                  resume=args.resume)
        how = f"rendered and written to {out} in {time.perf_counter() - t0:.1f}s"
    print(f"data: {args.images:,} images ({(truth.kind != 'original').sum():,} planted copies, {DATASETS} datasets), "
          f"fingerprints + {args.dim}-d embeddings, {how}")
    dedup_cfg = DedupConfig(**{k: v for k, v in (("route_pool", args.route_pool), ("routing", args.routing))
                               if v is not None})
    cluster_cfg = ClusterConfig(use_gpu=False)
    scale = ScaleConfig(mode=args.scale, shard_rows=args.shard_rows)
    wanted = [x for x in args.stages.split(",") if x]
    if not wanted:
        return
    if args.scale == "ray":
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    stages = (("dedup", lambda: run_dedup(out, dedup_cfg, force=True, scale=scale)),
              ("cluster", lambda: run_cluster(out, cluster_cfg, force=True, scale=scale)),
              ("balance", lambda: run_balance(out, BalanceConfig(), force=True, scale=scale)))
    if unknown := set(wanted) - {name for name, _ in stages}:
        raise SystemExit(f"--stages: unknown {sorted(unknown)}; choose from dedup, cluster, balance")
    stages = tuple((name, run) for name, run in stages if name in wanted)
    total = 0.0
    print(f"stages: {'Ray tasks' if args.scale == 'ray' else 'this process'}, shards of {args.shard_rows:,} rows")
    with PeakRSS() as overall:
        for name, run in stages:
            with PeakRSS() as mem:
                t = time.perf_counter()
                summary = run()
                dt = time.perf_counter() - t
            total += dt
            detail = {"dedup": lambda s: f"{s['total']['kept']:,} kept, {s['total']['exact']:,} exact, "
                                         f"{s['total']['near']:,} near, {s['search']['lists']:,} lists, "
                                         f"{s['search']['routing']} routing, "
                                         f"{s['search']['search_tasks']} search tasks",
                      "cluster": lambda s: f"levels {s['levels']}",
                      "balance": lambda s: f"{s['sampled_images']:,} images for {s['samples_per_epoch']:,} samples"}
            print(f"  {name:8s} {dt:8.1f}s  {mem.line()}  ({detail[name](summary)})")
    print(f"dedup -> cluster -> balance: {total:.1f}s ({total / 60:.2f} min), {overall.line()}; "
          f"dedup: {'exact' if args.images <= dedup_cfg.flat_max else 'partitioned'} fingerprint search")
    if args.scale == "ray":
        ray.shutdown()
    if args.reference:
        reference(out, dedup_cfg, cluster_cfg, args.recall_queries, args.seed, wanted)
    score(out, truth)
    if args.eval_images:
        leakage(out, truth, args.eval_images, args.seed)
    if args.baseline_images:
        baseline(out, min(args.baseline_images, args.images))


if __name__ == "__main__":
    main()
