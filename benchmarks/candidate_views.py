"""Candidate views for copy detection: how often a planted copy's source is the nearest image of one view.

Renders a slice of the planted collection (``cytoray.curation.synthetic.planted``, the plan of ``--plan`` images):
every planted copy, its source, the look-alikes planted next to the chosen rows and ``--others`` random rows. Then
for each view design, per view, each image's nearest other image under the 8 flips/rotations by exact search (faiss,
fp32), and reports per copy kind the share of copies whose source is the nearest image of the copy, or the copy the
nearest of the source, in some view, with cosine >= the candidate threshold (what ``dedup.candidate_pairs`` proposes
at ``dedup.candidates`` = 1), and the candidate pairs per image (on ``--sample`` random images).

Designs: ``current`` (``features.fingerprint``: a canonical window sized from the nucleus, and the frame) and
``earlier`` (before 2026-12-07: a canonical window of 4.5 sd of the pixels darker than 60%, at least half the image;
a window of 84% of the image on the same centre; the frame). Neither was tuned on this slice's seed.

    python benchmarks/candidate_views.py                 # 100k plan, 21,000 others: ~30k images, ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import time
from multiprocessing import Pool

import numpy as np

from cytoray.curation.synthetic import planted as P
from cytoray.curation.synthetic.copies import COPY_KINDS
from cytoray.curation.verification import dihedral_perms
from cytoray.features import fingerprint as F

_STATE: dict = {}


def _render(p: int):
    plan = _STATE["plan"]
    img, _ = P.render_row(_STATE["seed"], p, int(plan["kind"][p]), int(plan["source"][p]), int(plan["cls"][p]),
                          plan["stains"][plan["stain_ds"][p]])
    return img


def earlier_windows(work: np.ndarray) -> np.ndarray:
    h, w = work.shape
    cx, cy, sx, sy = F.dark_mass_frame(work, level=0.6)
    canonical = (cx / w, cy / h, max(4.5 * sx / w, 0.25), max(4.5 * sy / h, 0.25))
    return np.array([canonical, (cx / w, cy / h, 0.42, 0.42), (0.5, 0.5, 0.5, 0.5)], np.float32)


def _views(i: int) -> np.ndarray:
    work = F._work_image(F.grey(_STATE["images"][i]))
    frames = earlier_windows(work) if _STATE["design"] == "earlier" else F.view_frames(work)
    return F.band_pass(np.stack([F.sample_window(work, f) for f in frames]), F.VIEW_BAND)


def nearest(views: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per view, each query's nearest other image (best over the 8 flips/rotations): (V, Q) cosine and index."""
    import faiss

    n, nv, s, _ = views.shape
    perms = dihedral_perms(s)
    best = np.full((nv, len(queries)), -2.0)
    arg = np.full((nv, len(queries)), -1)
    for v in range(nv):
        x = views[:, v].reshape(n, -1).astype(np.float32)
        x -= x.mean(1, keepdims=True)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        for d in range(8):
            sim, idx = index.search(np.ascontiguousarray(x[queries][:, perms[d]]), 2)
            itself = idx[:, 0] == queries
            s_, i_ = np.where(itself, sim[:, 1], sim[:, 0]), np.where(itself, idx[:, 1], idx[:, 0])
            better = s_ > best[v]
            best[v, better], arg[v, better] = s_[better], i_[better]
    return best, arg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=int, default=100_000)
    ap.add_argument("--others", type=int, default=21_000)
    ap.add_argument("--sample", type=int, default=3_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="0.75,0.6")
    ap.add_argument("--designs", default="earlier,current")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    plan = P._plan(args.plan, 0.05, 0.05, args.seed)
    kind, src = plan["kind"], plan["source"]
    copies = np.flatnonzero((kind >= 0) & (kind < len(COPY_KINDS)))
    others = np.random.default_rng([args.seed, 7]).choice(args.plan, args.others, replace=False)
    look = np.flatnonzero(kind >= len(COPY_KINDS))
    look = look[np.isin(src[look], np.concatenate([src[copies], others]))]
    rows = np.unique(np.concatenate([copies, src[copies], others, look, src[look]]))
    _STATE.update(plan=plan, seed=args.seed)
    t0 = time.perf_counter()
    with Pool(args.workers) as pool:
        _STATE["images"] = pool.map(_render, rows.tolist(), chunksize=64)
    print(f"machine: {args.workers} workers; {len(rows):,} images rendered ({len(copies):,} planted copies, "
          f"{len(look):,} look-alikes) in {time.perf_counter() - t0:.0f}s")
    pos = np.searchsorted(rows, np.arange(args.plan))
    c, s = pos[copies], pos[src[copies]]
    sample = np.random.default_rng([args.seed, 8]).choice(len(rows), min(args.sample, len(rows)), replace=False)
    queries = np.unique(np.concatenate([c, s, sample]))
    qpos = {q: k for k, q in enumerate(queries)}
    qc, qs, qr = (np.array([qpos[x] for x in arr]) for arr in (c, s, sample))
    for design in args.designs.split(","):
        t0 = time.perf_counter()
        _STATE["design"] = design
        with Pool(args.workers) as pool:
            views = np.stack(pool.map(_views, range(len(rows)), chunksize=128)).astype(np.float32)
        best, arg = nearest(views, queries)
        for thr in (float(t) for t in args.thresholds.split(",")):
            hit = (((arg[:, qc] == s) & (best[:, qc] >= thr)) | ((arg[:, qs] == c) & (best[:, qs] >= thr))).any(0)
            pairs = {(min(sample[k], arg[v, q]), max(sample[k], arg[v, q])) for v in range(len(best))
                     for k, q in enumerate(qr) if best[v, q] >= thr}
            per_kind = " ".join(f"{name} {hit[kind[copies] == k].mean():.3f}" for k, name in enumerate(COPY_KINDS)
                                if (kind[copies] == k).any())
            print(f"{design} ({views.shape[1]} views), candidate threshold {thr}: source nearest for "
                  f"{hit.mean():.4f} of copies; {per_kind}; {len(pairs) / len(sample):.2f} candidate pairs per "
                  f"image ({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
