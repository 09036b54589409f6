"""Deduplication: exact (identical decoded pixels) and near-duplicate (faiss kNN, cosine above a threshold,
connected components by union-find), within and across datasets. Near-duplicates are searched on
instance fingerprints with flip/rotation/zoom query expansion (``dihedral_knn_edges``) — global colour
statistics cannot separate re-exports from other cells of the same class and source (precision <= 0.41
on the synthetic ground truth, benchmarks/RESULTS.md) — or on any L2-normalised embedding (``knn_edges``).

Keep policy — one image per component, the first by:
1. labelled (``cell_type`` not null) before unlabelled;
2. more pixels (width × height) before fewer (re-exports are usually downscaled);
3. position of its dataset in ``dataset_priority`` (unlisted datasets after listed ones);
4. ``image_id`` (deterministic tie-break).
Every other member goes to ``duplicates.parquet`` (image_id, duplicate_of, similarity, reason).

Leakage guard: with ``eval_manifests`` (held-out labelled sets), their images are embedded the same way and
every remaining training image whose fingerprint similarity to any evaluation image exceeds the stricter
``leakage_threshold`` is dropped too (``reason = "leakage"``, ``duplicate_of`` = the evaluation image,
``duplicate_of_dataset`` = ``eval:<manifest uri>``), counted per dataset.

Search is exact (``IndexFlatIP``) up to ``flat_max`` vectors and IVF above it (``nlist`` ≈ 4·√N,
``nprobe`` configurable; ``build_index``), so 1M+ vectors fit one machine; a faiss GPU index is used when
faiss sees a GPU. ``knn_edges`` on embeddings above ``flat_max`` on CPU searches by partitions instead
(``partitioned_edges``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    k: int = 8  # neighbours searched per image and query variant
    # Cosine of fingerprints above which two images are near-duplicates. Tuned on the synthetic collection
    # with seed 0 and checked on seed 123, where it finds every planted copy with no false pair; 0.98 lets
    # false pairs in (precision and recall: benchmarks/RESULTS.md).
    threshold: float = 0.985
    # Leakage guard: training images whose fingerprint cosine to any image of these evaluation manifests
    # (Parquet with a ``uri`` column; ``image_id`` optional) exceeds ``leakage_threshold`` are dropped.
    eval_manifests: list[str] = field(default_factory=list)
    # Stricter than ``threshold`` (it removes more): over-removal is the safe error for an evaluation set.
    # On the synthetic collection every planted copy scores well above it, and the few unrelated images that
    # score above it are dropped too (calibration: benchmarks/RESULTS.md).
    leakage_threshold: float = 0.975
    dataset_priority: list[str] = field(default_factory=list)
    flat_max: int = 200_000  # exact search up to this many vectors, IVF above
    nprobe: int = 16
    use_gpu: bool = True  # when faiss has GPUs


def gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def build_index(x: np.ndarray, cfg: DedupConfig):
    """Inner-product index over L2-normalised rows: flat for small N, IVF-flat for large N."""
    import faiss

    n, d = x.shape
    if n <= cfg.flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train = x[np.random.default_rng(0).choice(n, min(n, nlist * 64), replace=False)]
        index.train(train)
        index.nprobe = cfg.nprobe
    if cfg.use_gpu and gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def partitioned_edges(x: np.ndarray, threshold: float, cfg: DedupConfig, k: int | None = None,
                      list_size: int = 1000, probe: int = 2, chunk: int = 4096):
    """Near-duplicate pairs at scale (N > ``flat_max``): an IVF-style search with dense BLAS inside each list.

    faiss k-means splits the rows into ~N/``list_size`` lists (trained on a subsample); each row is stored
    in its nearest list and probes its ``probe`` nearest lists, so a pair is missed only if neither row's
    ``probe`` nearest centroids hold the other — for near-duplicates (cosine > 0.9) practically never,
    because a copy lands next to its original. Inside a list, queries × members is one matrix product.
    Cost ≈ N · probe · list_size · d flops instead of N² · d. Returns (i, j, cosine), i < j, with at most
    ``k`` partners per row when ``k`` is given.
    """
    import faiss

    n, d = x.shape
    nlist = max(1, n // list_size)
    km = faiss.Kmeans(d, nlist, niter=10, seed=1234, max_points_per_centroid=64, spherical=True, verbose=False)
    km.train(x)
    index = faiss.IndexFlatIP(d)
    index.add(km.centroids)
    _, lists = index.search(x, min(probe, nlist))
    home = lists[:, 0]
    order = np.argsort(home, kind="stable")
    bounds = np.searchsorted(home[order], np.arange(nlist + 1))
    probe_rows = np.repeat(np.arange(n), lists.shape[1])
    probe_lists = lists.ravel()
    porder = np.argsort(probe_lists, kind="stable")
    pbounds = np.searchsorted(probe_lists[porder], np.arange(nlist + 1))
    out_i, out_j, out_s = [], [], []
    for c in range(nlist):
        members = order[bounds[c]:bounds[c + 1]]
        queries = probe_rows[porder[pbounds[c]:pbounds[c + 1]]]
        if len(members) == 0 or len(queries) == 0:
            continue
        xm = x[members]
        for a in range(0, len(queries), chunk):
            q = queries[a:a + chunk]
            sims = x[q] @ xm.T
            qi, mi = np.nonzero(sims > threshold)
            keep = q[qi] != members[mi]
            out_i.append(q[qi[keep]])
            out_j.append(members[mi[keep]])
            out_s.append(sims[qi[keep], mi[keep]])
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s).astype(np.float32)
    a, b = np.minimum(i, j), np.maximum(i, j)
    key = a.astype(np.int64) * n + b
    by_pair = np.lexsort((-s, key))
    first = np.ones(len(key), bool)
    first[1:] = key[by_pair][1:] != key[by_pair][:-1]
    sel = by_pair[first]  # each pair once (found from both sides / several lists)
    a, b, s = a[sel], b[sel], s[sel]
    if k is not None:  # at most k partners per row, the most similar first
        o = np.lexsort((-s, a))
        rank = np.arange(len(o)) - np.searchsorted(a[o], a[o])
        sel = o[rank < k]
        a, b, s = a[sel], b[sel], s[sel]
    return a, b, s


def knn_edges(x: np.ndarray, k: int, threshold: float, cfg: DedupConfig, queries: np.ndarray | None = None):
    """Pairs (i, j, cosine) with cosine > threshold among each row's k nearest neighbours (self excluded
    when ``queries`` is None). Exact flat search up to ``flat_max`` rows; above it the partitioned search
    for a self-search on CPU, else ``build_index``'s IVF-flat (on the GPU when faiss sees one)."""
    if queries is None and x.shape[0] > cfg.flat_max and not (cfg.use_gpu and gpu_count() > 0):
        return partitioned_edges(x, threshold, cfg, k=k)
    index = build_index(x, cfg)
    q = x if queries is None else queries
    sims, nbrs = index.search(q, min(k + (queries is None), x.shape[0]))
    rows = np.repeat(np.arange(q.shape[0]), nbrs.shape[1])
    cols, s = nbrs.ravel(), sims.ravel()
    keep = (cols >= 0) & (s > threshold)
    if queries is None:
        keep &= cols != rows
    return rows[keep], cols[keep], s[keep]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def _dihedral_search(query_thumbs: np.ndarray, index_base: np.ndarray, k: int, threshold: float, cfg: DedupConfig,
                     exclude_self: bool) -> dict[tuple[int, int], float]:
    """{(query row, index row): best cosine over all zooms × flips × rotations of the query} above threshold."""
    index = build_index(index_base, cfg)
    best: dict[tuple[int, int], float] = {}
    kk = min(k + int(exclude_self), len(index_base))
    for z in range(query_thumbs.shape[1]):
        for flip in (False, True):
            for rot in range(4):
                t = query_thumbs[:, z, :, ::-1] if flip else query_thumbs[:, z]
                sims, nbrs = index.search(_unit_rows(np.rot90(t, rot, axes=(1, 2))), kk)
                rows = np.repeat(np.arange(len(t)), nbrs.shape[1])
                cols, s = nbrs.ravel(), sims.ravel()
                ok = (cols >= 0) & (s > threshold)
                if exclude_self:
                    ok &= cols != rows
                for i, j, v in zip(rows[ok].tolist(), cols[ok].tolist(), s[ok].tolist()):
                    if v > best.get((i, j), -1.0):
                        best[(i, j)] = v
    return best


def dihedral_knn_edges(thumbs: np.ndarray, k: int, threshold: float, cfg: DedupConfig):
    """Near-duplicate edges from fingerprint thumbnails (N, Z, s, s) (``embed.fingerprint_thumbnails``).

    The index holds each image's zoom-1 thumbnail; every image is queried with all zoom levels × the 8
    flips/rotations of its thumbnail, so flipped, rotated and slightly cropped copies are found exactly
    (query expansion instead of an invariant, lossy descriptor). Returns (i, j, cosine) with the best
    cosine per pair above ``threshold``.
    """
    best: dict[tuple[int, int], float] = {}
    for (i, j), v in _dihedral_search(thumbs, _unit_rows(thumbs[:, 0]), k, threshold, cfg, True).items():
        key = (min(i, j), max(i, j))
        best[key] = max(best.get(key, -1.0), v)
    pairs = np.array(list(best.keys()), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1], np.array(list(best.values()), dtype=np.float32)


def cross_edges(train_thumbs: np.ndarray, eval_thumbs: np.ndarray, k: int, threshold: float, cfg: DedupConfig):
    """Leakage guard edges: (train row, eval row, best cosine) above ``threshold``, searched both ways
    (training images against the evaluation index and evaluation images against the training index), so
    a copy is found whichever of the two was cropped or zoomed."""
    best = _dihedral_search(train_thumbs, _unit_rows(eval_thumbs[:, 0]), k, threshold, cfg, False)
    for (e, t), v in _dihedral_search(eval_thumbs, _unit_rows(train_thumbs[:, 0]), k, threshold, cfg, False).items():
        best[(t, e)] = max(best.get((t, e), -1.0), v)
    pairs = np.array(list(best.keys()), dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1], np.array(list(best.values()), dtype=np.float32)


def _pair_similarity(thumbs: np.ndarray, a: int, b: int) -> float:
    """Best fingerprint cosine of image a (any zoom, flip, rotation) against image b."""
    target = _unit_rows(thumbs[b : b + 1, 0])[0]
    variants = [np.rot90(t[:, ::-1] if f else t, r) for t in thumbs[a] for f in (False, True) for r in range(4)]
    return float((_unit_rows(np.stack(variants)) @ target).max())


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find with path halving; returns a root label per node."""
    parent = np.arange(n)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(i.tolist(), j.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(a) for a in range(n)])


def keep_order(labelled, width, height, dataset, image_id, priority: list[str]) -> np.ndarray:
    """Rank of each row under the keep policy (lower = keep first)."""
    rank = {d: r for r, d in enumerate(priority)}
    keys = [(not lab, -(w * h), rank.get(ds, len(priority)), iid)
            for lab, w, h, ds, iid in zip(labelled, width, height, dataset, image_id)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = np.arange(len(keys))
    return out


def deduplicate(manifest, embeddings: np.ndarray | None, cfg: DedupConfig,
                thumbs: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """manifest: pandas DataFrame (image_id, pixel_sha256, cell_type, width, height, dataset), rows aligned
    with ``embeddings`` (L2-normalised) and/or fingerprint ``thumbs``. Near-duplicates come from the
    fingerprints when given (recommended), else from the embeddings. Returns (keep mask, duplicate rows)."""
    n = len(manifest)
    rank = keep_order(manifest["cell_type"].notna().tolist(),
                      manifest["width"].tolist(), manifest["height"].tolist(), manifest["dataset"].tolist(),
                      manifest["image_id"].tolist(), cfg.dataset_priority)
    ii, jj, ss = [], [], []
    if cfg.exact:
        groups = manifest.groupby("pixel_sha256").indices
        for idx in groups.values():
            if len(idx) > 1:
                first = idx[0]
                ii += [first] * (len(idx) - 1)
                jj += list(idx[1:])
                ss += [1.0] * (len(idx) - 1)
    if cfg.near and n > 1 and (thumbs is not None or embeddings is not None):
        if thumbs is not None:
            a, b, s = dihedral_knn_edges(thumbs, cfg.k, cfg.threshold, cfg)
        else:
            a, b, s = knn_edges(embeddings, cfg.k, cfg.threshold, cfg)
        ii += a.tolist()
        jj += b.tolist()
        ss += s.tolist()
    i, j = np.asarray(ii, dtype=np.int64), np.asarray(jj, dtype=np.int64)
    comp = connected_components(n, i, j)
    sim = {}
    for a, b, s in zip(i.tolist(), j.tolist(), ss):
        sim[(a, b)] = sim[(b, a)] = max(s, sim.get((a, b), 0.0))
    keep = np.ones(n, dtype=bool)
    dups = []
    ids, sha = manifest["image_id"].tolist(), manifest["pixel_sha256"].tolist()
    by_comp: dict[int, list[int]] = {}
    for node, c in enumerate(comp.tolist()):
        by_comp.setdefault(c, []).append(node)
    for members in by_comp.values():
        if len(members) == 1:
            continue
        keeper = min(members, key=lambda m: rank[m])
        for m in members:
            if m == keeper:
                continue
            keep[m] = False
            is_exact = sha[m] == sha[keeper]
            s = 1.0 if is_exact else sim.get((keeper, m))
            if s is None:  # linked through other members of the component: compare the two directly
                s = (_pair_similarity(thumbs, m, keeper) if thumbs is not None
                     else float(embeddings[m] @ embeddings[keeper]))
            dups.append({"image_id": ids[m], "duplicate_of": ids[keeper], "similarity": float(s if s is not None else 0.0),
                         "reason": "exact" if is_exact else "near_duplicate"})
    log.info("dedup: %d images, %d duplicates (%d exact)", n, len(dups), sum(d["reason"] == "exact" for d in dups))
    return keep, dups


def read_eval_manifest(uri: str, storage_cfg=None):
    """An evaluation manifest as a pyarrow table (image_id, uri); image_id defaults to the uri."""
    import pyarrow as pa

    from cytoray.manifest import read_manifest

    table = read_manifest(uri, storage_cfg, ("uri",), optional=("image_id",), purpose="dedup.eval_manifests",
                          fix="an evaluation manifest lists its images by uri, like manifest.parquet",
                          allow_empty=True)
    ids = table.column("image_id") if "image_id" in table.column_names else table.column("uri")
    return pa.table({"image_id": pa.array([f"{i}" for i in ids.to_pylist()]), "uri": table.column("uri")})


def leakage_guard(train_fp: np.ndarray, eval_sets: list[tuple[str, list[str], np.ndarray]], cfg: DedupConfig):
    """{train row: (eval image id, eval set name, cosine)} for every training row above leakage_threshold
    (the closest evaluation image over all sets)."""
    hits: dict[int, tuple[str, str, float]] = {}
    for name, eval_ids, eval_fp in eval_sets:
        if len(eval_ids) == 0 or len(train_fp) == 0:
            continue
        t, e, s = cross_edges(train_fp, eval_fp, cfg.k, cfg.leakage_threshold, cfg)
        for ti, ei, v in zip(t.tolist(), e.tolist(), s.tolist()):
            if ti not in hits or v > hits[ti][2]:
                hits[ti] = (eval_ids[ei], name, v)
    return hits


def run_dedup(out_uri: str, cfg: DedupConfig, storage_cfg=None, force: bool = False, embed_cfg=None) -> dict:
    """Dedup stage: ``ingested.parquet`` + ``embeddings.parquet`` -> ``deduplicated.parquet`` (kept rows) and
    ``duplicates.parquet`` (every removed image, the one it duplicates, similarity, reason), then the leakage
    guard against ``cfg.eval_manifests`` (embedded with ``embed_cfg``, the run's embed settings).
    Reconciles per dataset: images in == kept + duplicates (incl. leakage) (the run fails otherwise)."""
    from cytoray.curation.embed import EmbedConfig
    from cytoray.curation.stage import run_stage

    embed_cfg = embed_cfg or EmbedConfig()
    return run_stage("dedup", out_uri, cfg, lambda run: _dedup(run, cfg, embed_cfg, storage_cfg), storage_cfg, force)


def _dedup(run, cfg: DedupConfig, embed_cfg, storage_cfg) -> dict:
    import pyarrow as pa

    from cytoray.curation.embed import embed_rows, load_embeddings
    from cytoray.features.fingerprint import fingerprints_of_table
    from cytoray.manifest import DUPLICATES_SCHEMA

    table = run.read("ingested.parquet")
    ids, emb, thumbs = load_embeddings(run.out_uri, storage_cfg)
    if ids != table.column("image_id").to_pylist():
        raise AssertionError("embeddings.parquet rows do not match ingested.parquet; rerun the embed stage "
                             "(force=true)")
    frame = table.select(["image_id", "pixel_sha256", "cell_type", "width", "height", "dataset"]).to_pandas()
    keep, dups = deduplicate(frame, emb, cfg, thumbs=thumbs)
    dataset_of = dict(zip(frame["image_id"], frame["dataset"]))
    for d in dups:
        d["dataset"], d["duplicate_of_dataset"] = dataset_of[d["image_id"]], dataset_of[d["duplicate_of"]]
    if cfg.eval_manifests:
        eval_sets = []
        for uri in cfg.eval_manifests:
            rows = read_eval_manifest(uri, storage_cfg)
            fp = fingerprints_of_table(embed_rows(rows, embed_cfg, storage_cfg))
            eval_sets.append((f"eval:{uri}", rows.column("image_id").to_pylist(), fp))
        kept_rows = np.flatnonzero(keep)
        hits = leakage_guard(thumbs[kept_rows], eval_sets, cfg)
        ids = frame["image_id"].tolist()
        for r in sorted(hits):
            eval_id, name, v = hits[r]
            keep[kept_rows[r]] = False
            i = ids[kept_rows[r]]
            dups.append({"image_id": i, "duplicate_of": eval_id, "similarity": float(v), "reason": "leakage",
                         "dataset": dataset_of[i], "duplicate_of_dataset": name})
        log.info("leakage guard: %d training images dropped as near-copies of %d evaluation images",
                 len(hits), sum(len(e[1]) for e in eval_sets))
    dup_table = pa.Table.from_pylist(dups, schema=DUPLICATES_SCHEMA)
    kept = table.filter(pa.array(keep))
    run.publish("deduplicated.parquet", kept)
    run.publish("duplicates.parquet", dup_table)

    per: dict[str, dict] = {}
    for name in sorted(set(frame["dataset"])):
        images = int((frame["dataset"] == name).sum())
        mine = [d for d in dups if d["dataset"] == name]
        per[name] = {"images": images, "kept": int(keep[(frame["dataset"] == name).to_numpy()].sum()),
                     "duplicates": len(mine), "exact": sum(d["reason"] == "exact" for d in mine),
                     "near": sum(d["reason"] == "near_duplicate" for d in mine),
                     "leakage": sum(d["reason"] == "leakage" for d in mine),
                     "cross_dataset": sum(d["dataset"] != d["duplicate_of_dataset"] and d["reason"] != "leakage"
                                          for d in mine)}
        if per[name]["images"] != per[name]["kept"] + per[name]["duplicates"]:
            raise AssertionError(f"dedup accounting broken for {name}: {per[name]}")
    total = {k: sum(d[k] for d in per.values()) for k in ("images", "kept", "duplicates", "exact", "near",
                                                            "leakage", "cross_dataset")}
    summary = {"stage": "dedup", "threshold": cfg.threshold, "k": cfg.k, "datasets": per, "total": total,
               "leakage_threshold": cfg.leakage_threshold, "eval_manifests": list(cfg.eval_manifests)}
    return summary
