"""Curation stages at scale: the pipeline's own dedup -> cluster -> balance on a run directory holding what
ingest and embed write (``ingested.parquet``; ``embeddings.parquet`` with embeddings and uint8 fingerprints;
their ``_stages`` markers), with planted copies whose ground truth is known.

    python benchmarks/curation.py                                   # 100,000 images
    python benchmarks/curation.py --images 10000 --baseline-images 10000
    # 5M: write the stage files once (resumable), then time the stages on them
    python benchmarks/curation.py --images 5000000 --out /tmp/bench5m --resume --stages ''
    python benchmarks/curation.py --images 5000000 --out /tmp/bench5m --reuse --eval-images 0 --baseline-images 0

Images are synthetic cells (``synthetic.cells.render_cell``, 96 px, one stain per dataset) fingerprinted as the
embed stage does (``features.fingerprint``); about ``--copy-rate`` of them are planted copies of another image
(``synthetic.copies``: exact, JPEG quality 50-95, flips, quarter turns, crops of 2-10% off one or two sides, another
box over the smear field, scale 0.5-0.9 and 1.1-1.5, blur, brightness/gamma, stain shifts, and pairs of these) and
``--lookalike-rate`` are distinct cells made to look like another (same class, stain, size and position — more often
for the featureless classes — or an overlapping crop of the same field). 40% of copies are in another dataset.
Embeddings (``--dim``) are a skewed mixture (2,000 Pareto-weighted modes); 13 datasets of very different sizes.

Prints per stage: wall time and peak RSS of this process (sampled); for dedup the candidate pairs per image and the
verification counts. Then planted-pair precision and recall of ``duplicates.parquet`` per kind of copy, distinct
cells lost per class, look-alike pairs removed, and where the missed copies were lost (each (copy, source) pair
verified here: one scoring >= dedup.threshold was never proposed by the candidate search); the leakage guard against ``--eval-images`` of the originals
(flagged: the evaluation images themselves, their planted copies, unrelated); the fingerprint bytes per image.
Baseline in the same process: the decision copy detection replaced (one cosine threshold, 0.985, on grey centre
thumbnails at three zooms, computed here from the verification thumbnails) on the first ``--baseline-images``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cytoray.curation.dedup import ROUTINGS  # noqa: E402
from cytoray.curation.synthetic.planted import DATASETS, write_planted_run  # noqa: E402


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


def baseline(out: str, truth, rows: int) -> None:
    """The decision before copy detection — fingerprint cosine above 0.985 among each image's 8 nearest, searched over
    3 centred zooms × 8 flips/rotations of 32 × 32 grey thumbnails — on the first ``rows`` images, scored like the
    stage; the thumbnails are made from the verification thumbnails (the whole image, squashed)."""
    from PIL import Image

    from cytoray.curation import dedup as D
    from cytoray.curation.embed import load_embeddings
    from cytoray.curation.synthetic.scoring import dedup_precision_recall

    ids, _, prints = load_embeddings(out)
    ids, verify = ids[:rows], prints["verify"][:rows]
    side = verify.shape[-1]
    thumbs = np.empty((len(verify), 3, 32, 32), np.uint8)
    for i, v in enumerate(verify):
        im = Image.fromarray(v)
        for z, zoom in enumerate((1.0, 1.08, 1.16)):
            s = side / zoom
            box = ((side - s) / 2, (side - s) / 2, (side + s) / 2, (side + s) / 2)
            thumbs[i, z] = np.asarray(im.resize((32, 32), Image.BOX, box=box))
    cfg = D.DedupConfig()
    t0 = time.perf_counter()
    q, m, sim = D._dihedral_search(thumbs, thumbs, 8, 0.985, cfg, same=True)
    a, b, sim = D._best_per_pair(np.minimum(q, m), np.maximum(q, m), sim)
    dt = time.perf_counter() - t0
    keep, dup_of, _, _ = D.resolve(np.arange(len(ids)), np.arange(len(ids)), a, b, sim)
    dups = [{"image_id": ids[i], "duplicate_of": ids[int(dup_of[i])]} for i in np.flatnonzero(~keep)]
    present = set(ids)
    sub = truth[truth.image_id.isin(present)]
    sub = sub[~(sub.kind.isin(["near_duplicate", "exact_duplicate"]) & ~sub.duplicate_of.isin(present))]
    s = dedup_precision_recall(dups, sub)
    print(f"baseline (cosine >= 0.985 on centre thumbnails, no verification), first {len(ids):,} images: "
          f"{dt:.1f}s; precision {s['precision']:.4f} ({s['false_removals']} distinct cells removed), recall "
          f"{s['recall']:.4f}; by kind: " + ", ".join(f"{k} {v:.2f}" for k, v in s["recall_by_transform"].items()))


def leakage(out: str, truth, n_eval: int, seed: int) -> None:
    """The leakage guard (``dedup.leakage_pairs``, in this process) of every image against ``n_eval`` originals as an
    evaluation set: time, flagged images (the evaluation images themselves, their planted copies, unrelated)."""
    from cytoray.curation.dedup import DedupConfig, leakage_pairs
    from cytoray.curation.embed import load_embeddings
    from cytoray.curation.synthetic.scoring import leakage_scores

    ids, _, prints = load_embeddings(out)
    originals = truth.image_id[truth.kind == "original"].to_numpy()
    chosen = np.sort(np.random.default_rng(seed).choice(originals, min(n_eval, len(originals)), replace=False))
    row = {k: r for r, k in enumerate(ids)}
    evals = np.array([row[k] for k in chosen])
    cfg = DedupConfig()
    t0 = time.perf_counter()
    pairs = leakage_pairs(prints, {k: v[evals] for k, v in prints.items()}, cfg)
    dt = time.perf_counter() - t0
    best: dict[int, tuple] = {}
    for k in np.flatnonzero(pairs.verified(cfg.leakage_threshold)).tolist():
        t = int(pairs.b[k])
        if t not in best or pairs.score[k] > best[t][1]:
            best[t] = (chosen[int(pairs.a[k])], float(pairs.score[k]))
    dups = [{"image_id": ids[t], "duplicate_of": e, "reason": "leakage"} for t, (e, _) in best.items()]
    s = leakage_scores(dups, truth, set(chosen.tolist()))
    print(f"leakage guard, {len(ids):,} images against {len(evals):,} evaluation images: {dt:.1f}s, "
          f"{len(pairs.a):,} candidate pairs; flagged {s['flagged']:,} = {s['self']:,} evaluation images themselves + "
          f"{s['planted_copies_flagged']:,} of {s['planted_copies']:,} planted copies + {s['unrelated']:,} unrelated")
    # where the cut sits: every verified pair's score from 0.5 up, planted copies of evaluation images vs the rest
    source = dict(zip(truth.image_id, truth.duplicate_of))
    copy_s, other_s = [], []
    for k in np.flatnonzero(pairs.verified(0.5)).tolist():
        e, t = chosen[int(pairs.a[k])], ids[int(pairs.b[k])]
        if e != t:
            (copy_s if source.get(t) == e else other_s).append(float(pairs.score[k]))
    lo = f"{min(copy_s):.3f}" if copy_s else "-"
    hi = f"{max(other_s):.3f}" if other_s else "-"
    print(f"  scores: planted copies {len(copy_s):,} pairs, lowest {lo}; other pairs >= 0.5: {len(other_s):,}, "
          f"highest {hi} (leakage_threshold {cfg.leakage_threshold})")


def score(out: str, truth) -> None:
    from cytoray.curation.synthetic.scoring import dedup_precision_recall
    from cytoray.tables import read_table

    table = read_table(os.path.join(out, "duplicates.parquet")).to_pandas()
    dups = table[table.reason != "leakage"].to_dict("records")
    s = dedup_precision_recall(dups, truth)
    copies = truth[truth.kind.isin(["near_duplicate", "exact_duplicate"])]
    src_ds = dict(zip(truth.image_id, truth.dataset))
    across = copies[[src_ds[d] != x for d, x in zip(copies.duplicate_of, copies.dataset)]]
    cross = dedup_precision_recall(dups, truth[truth.image_id.isin(across.image_id) | (truth.kind == "original")])
    lost = s["distinct_lost_by_class"]
    worst = max(lost, key=lost.get)
    print(f"planted copies: {s['planted']:,}; duplicates reported {s['reported']:,}; precision {s['precision']:.4f} "
          f"({s['false_removals']} distinct cells removed), recall {s['recall']:.4f} (across datasets "
          f"{cross['recall']:.4f})")
    print("  recall by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in s["recall_by_transform"].items()))
    print(f"  distinct cells lost per class: largest {worst} {lost[worst]:.4f}" +
          "".join(f", {k} {v:.4f}" for k, v in lost.items() if v and k != worst))
    print(f"  look-alike pairs planted {s['lookalike_pairs']:,}, removed as duplicates {s['lookalike_pairs_removed']}")
    for r in table[table.reason == "near_duplicate"].nsmallest(3, "similarity").itertuples():
        print(f"  lowest-scoring removal: {r.image_id} of {r.duplicate_of}, score {r.similarity:.3f} ({r.transform})")
    missed_copies(out, truth, s["missed"])


def missed_copies(out: str, truth, missed: list[str]) -> None:
    """Where the planted copies that were not found got lost: each (copy, source) pair verified here — a pair that
    scores >= dedup.threshold was never proposed (lost in the candidate search), one below it was proposed or not
    but the verifier rejects it (lost in verification)."""
    import pyarrow.dataset as pds

    from cytoray.curation.dedup import DedupConfig, verify
    from cytoray.features.fingerprint import FINGERPRINT_COLUMNS, fingerprints_of_table

    if not missed:
        return
    sub = truth.set_index("image_id").loc[missed]
    need = sorted(set(missed) | set(sub.duplicate_of))  # only these rows' fingerprints are read
    table = pds.dataset(os.path.join(out, "embeddings.parquet")).to_table(
        columns=["image_id", *FINGERPRINT_COLUMNS.values()], filter=pds.field("image_id").isin(need))
    prints = fingerprints_of_table(table)
    row = {k: r for r, k in enumerate(table.column("image_id").to_pylist())}
    a = np.array([row[k] for k in sub.duplicate_of])
    b = np.array([row[k] for k in missed])
    pairs = verify(prints, a, b, np.ones(len(a)), np.zeros(len(a), np.int8))
    thr = DedupConfig().threshold
    search = pairs.score >= thr
    print(f"  missed copies {len(missed):,}: {int(search.sum())} verify >= {thr} (lost in the candidate search), "
          f"{int((~search).sum())} below (lost in verification)")
    for kind in sorted(set(sub["transform"])):
        k = (sub["transform"] == kind).to_numpy()
        low = np.sort(pairs.score[k & ~search])[:3]
        print(f"    {kind}: {int((k & search).sum())} search, {int((k & ~search).sum())} verification"
              + (f" (scores {', '.join(f'{x:.2f}' for x in low)}{', ...' if (k & ~search).sum() > 3 else ''}; "
                 f"e.g. {', '.join(sub.index[k & ~search][:2])})" if (k & ~search).any() else ""))


def reference(out: str, dedup_cfg, cluster_cfg, recall_queries: int, seed: int, stages: list[str]) -> None:
    """The stages' results against the single-process, in-memory algorithms on the whole arrays: dedup's
    decisions (``dedup.deduplicate``), cluster labels (adjusted Rand index against ``hierarchical_kmeans``), and
    the partitioned candidate search's recall against the exact search for ``recall_queries`` random images; the
    cluster comparison only when ``stages`` ran cluster (its output is from the same dedup run then)."""
    from sklearn.metrics import adjusted_rand_score

    from cytoray.curation import dedup as D
    from cytoray.curation.cluster import hierarchical_kmeans
    from cytoray.curation.embed import load_embeddings
    from cytoray.tables import read_table

    ids, emb, prints = load_embeddings(out)
    frame = read_table(os.path.join(out, "ingested.parquet"),
                       columns=["image_id", "pixel_sha256", "cell_type", "width", "height", "dataset"]).to_pandas()
    t0 = time.perf_counter()
    keep, dups, _ = D.deduplicate(frame, dedup_cfg, prints=prints)
    t_dedup = time.perf_counter() - t0
    stage = read_table(os.path.join(out, "duplicates.parquet")).to_pandas()
    ref = {(d["image_id"], d["duplicate_of"], d["reason"]) for d in dups}
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
    del emb, frame
    search_recall(prints["views"], dedup_cfg, recall_queries, seed)


def search_recall(views: np.ndarray, dedup_cfg, recall_queries: int, seed: int) -> None:
    """The partitioned candidate search's recall against the exact search (faiss-free brute force over every image,
    the 8 flips/rotations, both views) for ``recall_queries`` random images. The partitioned side is the in-memory
    search (``dedup.candidate_pairs``), which the stage's join equals pair for pair (same lists, same probes:
    tests/curation/test_dedup_shards.py)."""
    from cytoray.curation import dedup as D

    if recall_queries and len(views) > dedup_cfg.flat_max:
        rng = np.random.default_rng(seed)
        q = np.sort(rng.choice(len(views), min(recall_queries, len(views)), replace=False))
        exact_cfg = dataclasses.replace(dedup_cfg, flat_max=len(views) + 1)
        t0 = time.perf_counter()
        qi, mi, _, _ = D._directed_candidates(views[q], views, exact_cfg, same=False)
        t_exact = time.perf_counter() - t0
        own = q[qi] != mi
        exact_pairs = {(min(a, b), max(a, b)) for a, b in zip(q[qi][own].tolist(), mi[own].tolist())}
        a, b, _, _ = D.candidate_pairs(views, dedup_cfg)
        part = set(zip(a.tolist(), b.tolist()))
        found = len(exact_pairs & part)
        print(f"partitioned vs exact candidate search, {len(q):,} random query images against all {len(views):,}: "
              f"exact finds {len(exact_pairs):,} pairs ({t_exact:.1f}s), the partitioned search {found:,} of them: "
              f"recall {found / max(1, len(exact_pairs)):.4f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--copy-rate", type=float, default=0.05)
    ap.add_argument("--lookalike-rate", type=float, default=0.05)
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
    ap.add_argument("--candidates", type=int, default=None, help="dedup.candidates (default: the config default)")
    ap.add_argument("--partition-rows", type=int, default=None,
                    help="dedup.partition_rows (default: the config default); smaller gives the partition count of a "
                         "larger collection")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                    help="compare with the in-memory algorithms (default: up to 200,000 images)")
    ap.add_argument("--recall-queries", type=int, default=None,
                    help="images whose exact search measures the partitioned search's recall (default: 2,000 with "
                         "--reference, else 0)")
    ap.add_argument("--part-rows", type=int, default=16_384, help="rows per part file of the planted stage files")
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
                                  resume=args.resume, lookalike_rate=args.lookalike_rate)
        how = f"rendered and written to {out} in {time.perf_counter() - t0:.1f}s"
    from cytoray.features.fingerprint import FINGERPRINT_BYTES

    on_disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(out, "embeddings.parquet"))
                  for f in fs)
    print(f"data: {args.images:,} images ({truth.kind.isin(['near_duplicate', 'exact_duplicate']).sum():,} planted "
          f"copies, {(truth.kind == 'lookalike').sum():,} look-alikes, {DATASETS} datasets), fingerprints "
          f"({FINGERPRINT_BYTES:,} bytes per image; embeddings.parquet {on_disk / args.images:,.0f} bytes per image on "
          f"disk with the {args.dim}-d embeddings), {how}")
    dedup_cfg = DedupConfig(**{k: v for k, v in (("route_pool", args.route_pool), ("routing", args.routing),
                                                  ("candidates", args.candidates),
                                                  ("partition_rows", args.partition_rows)) if v is not None})
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
                                         f"{s['total']['near']:,} near; "
                                         f"{s['verification']['near']['candidates'] / args.images:.2f} candidate "
                                         f"pairs per image, {s['verification']['near']['verified']:,} verified, "
                                         f"{s['verification']['near']['unverifiable']:,} unverifiable; "
                                         f"{s['search']['lists']:,} lists in {s['search']['partitions']} "
                                         f"partitions, {s['search']['routing']} routing, each image's row sent "
                                         f"to {s['search']['routed_per_image_view']:.2f} partitions per view; the "
                                         f"join read {s['search']['bytes_read_per_image']:,.0f} bytes per image ("
                                         + ", ".join(f"{k} {v / args.images:,.0f}"
                                                     for k, v in s['search']['bytes_read'].items()) + ")",
                      "cluster": lambda s: f"levels {s['levels']}",
                      "balance": lambda s: f"{s['sampled_images']:,} images for {s['samples_per_epoch']:,} samples"}
            print(f"  {name:8s} {dt:8.1f}s  {mem.line()}  ({detail[name](summary)})")
    print(f"dedup -> cluster -> balance: {total:.1f}s ({total / 60:.2f} min), {overall.line()}; "
          f"dedup: {'exact' if args.images <= dedup_cfg.flat_max else 'partitioned'} candidate search")
    if args.scale == "ray":
        ray.shutdown()
    if args.recall_queries is None:
        args.recall_queries = 2000 if args.reference else 0
    if args.reference:
        reference(out, dedup_cfg, cluster_cfg, args.recall_queries, args.seed, wanted)
    elif args.recall_queries:
        from cytoray.features.fingerprint import FINGERPRINT_COLUMNS, VIEW_SIZE, VIEWS
        from cytoray.tables import read_table, unpack_vectors

        col = read_table(os.path.join(out, "embeddings.parquet"), columns=[FINGERPRINT_COLUMNS["views"]]).column(0)
        views = unpack_vectors(col, np.uint8).reshape(len(col), len(VIEWS), VIEW_SIZE, VIEW_SIZE)
        del col
        search_recall(views, dedup_cfg, args.recall_queries, args.seed)
    score(out, truth)
    if args.eval_images:
        leakage(out, truth, args.eval_images, args.seed)
    if args.baseline_images:
        baseline(out, truth, min(args.baseline_images, args.images))


if __name__ == "__main__":
    main()
