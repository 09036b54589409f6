"""The dedup stage over shards of the stage files: the rules of ``curation.dedup`` with a driver whose memory does
not grow with the images' payload.

Every pass below is one function over row-range shards (``curation.shards``), run as Ray tasks or in this
process (``scale.mode``); both run the same code on the same shards, so they give the same duplicates.

1. **scan**: per shard, a 64-bit hash of each image's pixel hash, its dataset, and for each view the route rows of
   the coarse k-means sample (``dedup.coarse_sample``: the same rows the in-memory search trains on).
2. The driver trains the coarse lists of each view (k-means centroids) on that sample; up to ``dedup.flat_max``
   images there is one list and the search is exact.
3. **route**: per shard and view, each image's home list; the view's prints are written to the stage's staging
   directory by partition (contiguous list ranges of about ``dedup.partition_rows`` images): the index.
4. **candidates** (the leakage guard's first, then near duplicates): per group of query shards (``query_groups``),
   every flip/rotation of each view probes its ``list_probe`` nearest lists; the task loads the index partitions
   those lists are in, one at a time, and keeps each query image's ``dedup.candidates`` best images per view above
   ``dedup.candidate_threshold`` (``dedup.search_members``). Evaluation images are one more query group, and each
   training shard is also searched against the evaluation images.
5. **verify**: the candidate pairs are cut into groups of ``dedup.verify_pairs``; a scatter pass over the shards
   writes the fingerprints of each group's images to the staging directory (one file per group and shard), and one
   task per group reads them and verifies its pairs (``verification.verify_pairs``). Only what a pair needs travels:
   no task reads the whole collection.
6. The driver resolves the keep decisions (``dedup.resolve``) on the rows that matter — rows sharing a pixel
   64-bit hash and rows with a verified edge — after fetching just their keep-policy keys (**keys**).
7. **write**: ``deduplicated.parquet`` (one file here; a directory of part files from Ray tasks),
   ``duplicates.parquet``, and ``kept_rows.npy`` (one bit per ingested row) for the stages after.

The driver holds 8 bytes per image (the 64-bit hash) plus the coarse sample, the candidate pairs (about one per
image, 45 bytes each) and the involved rows' keys. A search task holds its group's views (4 KB per image: uint8
and int8 rows) and one index partition; a verification task its pairs' fingerprints (11.3 KB per image).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cytoray import storage
from cytoray.curation import dedup as D
from cytoray.curation.shards import (
    KEPT_MASK,
    Layout,
    ScaleConfig,
    layout,
    map_shards,
    publish_mask,
    read_rows,
    remove,
    use_ray,
    write_part,
)

log = logging.getLogger(__name__)

KEY_COLUMNS = ["image_id", "pixel_sha256", "cell_type", "width", "height", "dataset"]
SCORE_BINS = np.linspace(-1.0, 1.0, 41)  # histograms of verified scores in the summary (and the report)


@dataclass(frozen=True)
class Context:
    """What every shard task needs (put in the object store once)."""

    ingested: Layout
    embeddings: Layout
    staging: str
    storage_cfg: storage.StorageConfig | None
    nlist: int
    partitions: int

    def partition_of(self, lists: np.ndarray) -> np.ndarray:
        return np.asarray(lists, np.int64) * self.partitions // max(1, self.nlist)

    def part_uri(self, view: int, partition: int, shard: int) -> str:
        return storage.join_uri(self.staging, "index", f"v{view}", f"p{partition:05d}", f"s{shard:05d}.npz")

    def pairs_uri(self, tag: str, group: int, shard: int = -1) -> str:
        """A verification group's directory (``shard`` -1) or its file from one shard; ``tag`` names the round."""
        base = storage.join_uri(self.staging, "verify", tag, f"g{group:05d}")
        return base if shard < 0 else storage.join_uri(base, f"s{shard:05d}.npz")


def _fingerprints(ctx: Context, a: int, b: int, views_only: bool = False):
    """(image ids, fingerprints) of rows [a, b) of embeddings.parquet (``features.fingerprint``)."""
    import pyarrow as pa

    from cytoray.features.fingerprint import FINGERPRINT_COLUMNS, fingerprints_of_table

    cols = ["image_id"] + ([FINGERPRINT_COLUMNS["views"]] if views_only else list(FINGERPRINT_COLUMNS.values()))
    t = read_rows(ctx.embeddings, a, b, cols, ctx.storage_cfg)
    ids = t.column("image_id").to_pylist()
    if views_only:
        from cytoray.features.fingerprint import VIEW_SIZE, VIEWS
        from cytoray.tables import unpack_vectors

        prints = {"views": unpack_vectors(t.column("fingerprint"), np.uint8).reshape(len(ids), len(VIEWS), VIEW_SIZE,
                                                                                     VIEW_SIZE)}
    else:
        prints = fingerprints_of_table(t)
    del t
    # Decoding the fingerprint lists leaves ~10x their size in Arrow's memory pool, which keeps it.
    pa.default_memory_pool().release_unused()
    return ids, prints


def _base_rows(views: np.ndarray) -> np.ndarray:
    """Centred unit rows of one view (N, 1, s, s) (what the index holds)."""
    return D._variant_rows(views, D._centring(views), np.arange(len(views)), 0)


def _scan(shard, ctx: Context, sample: np.ndarray, pool: int, invariant: bool) -> dict:
    _, i, a, b = shard
    ing = read_rows(ctx.ingested, a, b, ["image_id", "pixel_sha256", "dataset"], ctx.storage_cfg)
    ids, prints = _fingerprints(ctx, a, b, views_only=True)
    if ids != ing.column("image_id").to_pylist():
        raise AssertionError(f"embeddings.parquet rows {a}..{b} do not match ingested.parquet; rerun the embed "
                             "stage (force=true)")
    sha = np.array([int.from_bytes(hashlib.blake2b((h or "").encode(), digest_size=8).digest(), "little")
                    for h in ing.column("pixel_sha256").to_pylist()], np.uint64)
    rows = sample[(sample >= a) & (sample < b)] - a
    views = prints["views"]
    samples = [D.route_rows(_base_rows(views[rows, v:v + 1]), pool, invariant) if len(rows) else None
               for v in range(views.shape[1])]
    return {"sha": sha, "datasets": Counter(ing.column("dataset").to_pylist()), "samples": samples}


def _router(lists: bytes | None):
    """The lists' index (``dedup._kmeans_lists``) from its serialised bytes (built once, in the driver)."""
    import faiss

    return None if lists is None else faiss.deserialize_index(lists)


def _route(shard, ctx: Context, lists: list, pool: int, invariant: bool) -> int:
    _, i, a, b = shard
    _, prints = _fingerprints(ctx, a, b, views_only=True)
    for v, view_lists in enumerate(lists):
        view = D.Prints(np.ascontiguousarray(prints["views"][:, v:v + 1]))  # made once here, not per query task
        index = _router(view_lists)
        home = np.zeros(b - a, np.int64) if index is None else \
            index.search(D.route_rows(view.exact(np.arange(b - a), 0), pool, invariant), 1)[1][:, 0]
        part = ctx.partition_of(home)
        for p in np.unique(part).tolist():
            sel = np.flatnonzero(part == p)
            buf = io.BytesIO()
            np.savez(buf, rows=sel + a, home=home[sel], **{k: x[sel] for k, x in view.arrays().items()})
            storage.write_bytes(ctx.part_uri(v, p, i), buf.getvalue(), ctx.storage_cfg)
    return b - a


def _load_partition(ctx: Context, view: int, p: int, excluded: np.ndarray | None):
    """(index prints sorted by list (``dedup.Prints``), their row ids, their lists, bytes read) of partition ``p``
    of a view (None when it holds nothing)."""
    fs, path = storage.filesystem(storage.join_uri(ctx.staging, "index", f"v{view}", f"p{p:05d}"), ctx.storage_cfg)
    found = storage.with_retries(lambda: sorted(fs.find(path)), ctx.storage_cfg, f"list index partition {p}")
    parts: dict[str, list] = {}
    nbytes = 0
    for f in found:  # s<shard>.npz in shard order: one listing, no request per (partition, shard)
        if not f.endswith(".npz"):
            continue
        raw = storage.with_retries(lambda f=f: fs.cat_file(f), ctx.storage_cfg, f"read {f}")
        nbytes += len(raw)
        z = np.load(io.BytesIO(raw))
        ok = slice(None) if excluded is None else ~excluded[z["rows"]]
        for k in z.files:
            parts.setdefault(k, []).append(z[k][ok])
    if not parts:
        return None
    rows, home = np.concatenate(parts.pop("rows")), np.concatenate(parts.pop("home"))
    order = np.argsort(home, kind="stable")  # by list; within a list by row (files in shard order)
    arrays = {k: np.concatenate(parts.pop(k))[order] for k in list(parts)}  # pieces freed key by key
    return D.Prints.of_arrays(arrays), rows[order], home[order], nbytes


def _search(query, ctx: Context, lists: list, probe: int, excluded_bits: np.ndarray | None, eval_views: list,
            cfg: D.DedupConfig):
    """Candidates of one query group, per view: ("shard", g, a, b) -> (query row, index row, cosine, view) with
    each query image's ``cfg.candidates`` best index images per view; ("eval", j) -> (eval row, row, cosine, view);
    then the bytes of index partitions this task read (what grows with N: every task reads the partitions its
    queries probe)."""
    excluded = None if excluded_bits is None else np.unpackbits(excluded_bits, count=ctx.ingested.rows).astype(bool)
    if query[0] == "shard":
        _, i, a, b = query
        _, prints = _fingerprints(ctx, a, b, views_only=True)
        views, same_ids = prints["views"], np.arange(a, b)
    else:
        views, same_ids = eval_views[query[1]], None
    out = []
    nbytes = 0
    for v, view_lists in enumerate(lists):
        queries = D.Prints(np.ascontiguousarray(views[:, v:v + 1]))
        index = _router(view_lists)
        probes = np.zeros((len(views), 8, 1), np.int64) if index is None else \
            D._probe_lists(index, queries, probe, cfg.route_pool, cfg.invariant_routing)
        if same_ids is not None and excluded is not None:
            probes[excluded[same_ids]] = -1
        part = np.where(probes >= 0, ctx.partition_of(probes), -1)
        found = []
        for p in np.unique(part[part >= 0]).tolist():
            loaded = _load_partition(ctx, v, p, excluded)
            if loaded is None:
                continue
            nbytes += loaded[3]
            if len(loaded[0]) == 0:
                continue
            base, ids, homes, _ = loaded
            found.append(D.search_members(queries, np.where(part == p, probes, -1), base, ids, homes, cfg.candidates,
                                          cfg.candidate_threshold, same_ids=same_ids))
            del loaded, base
        if not found:
            continue
        qv, m, s = (np.concatenate(x) for x in zip(*found))
        top = D._top_per_group(qv, s, m, cfg.candidates)  # each query variant's best over all its lists
        q, m, s = D._best_per_pair(qv[top] // 8, m[top], s[top])
        best = D._top_per_group(q, s, m, cfg.candidates)  # the query image's best images in this view
        q = q[best] if same_ids is None else same_ids[q[best]]
        out.append((q, m[best], s[best], np.full(len(best), v, np.int8)))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8), nbytes
    return (*(np.concatenate(x) for x in zip(*out)), nbytes)


def query_groups(shards: list, search_rows: int, scale: ScaleConfig) -> list:
    """The search pass's queries: runs of consecutive shards as one ("shard", group, first row, stop row) each, of
    at most ``search_rows`` rows (at least one shard) and, when there are enough shards, at least
    ``scale.max_in_flight`` groups (``DedupConfig.search_rows``)."""
    if search_rows < 1:
        raise ValueError(f"curation dedup.search_rows={search_rows} must be >= 1")
    per = max(1, min(search_rows // max(1, scale.shard_rows), -(-len(shards) // max(1, scale.max_in_flight))))
    return [("shard", g, shards[j][2], shards[min(len(shards), j + per) - 1][3])
            for g, j in enumerate(range(0, len(shards), per))]


def _cross_shard(shard, ctx: Context, eval_views: list, cfg: D.DedupConfig):
    """Leakage candidates, training side: this shard's images against each evaluation set (exact or the in-memory
    lists over the evaluation set). Returns per set (training row, eval row, cosine, view)."""
    _, i, a, b = shard
    _, prints = _fingerprints(ctx, a, b, views_only=True)
    out = []
    for ev in eval_views:
        t, e, s, v = D._directed_candidates(prints["views"], ev, cfg, same=False)
        out.append((t + a, e, s, v))
    return out


def _scatter(job, ctx: Context) -> int:
    """Write the fingerprints of a shard's rows that the verification groups need: job = (shard, rows (sorted, in
    the shard), the group of each); one file per group."""
    (_, i, a, b), rows, groups, tag = job
    if not len(rows):
        return 0
    _, prints = _fingerprints(ctx, a, b)
    for g in np.unique(groups).tolist():
        sel = rows[groups == g]
        buf = io.BytesIO()
        np.savez(buf, rows=sel, **{k: x[sel - a] for k, x in prints.items()})
        storage.write_bytes(ctx.pairs_uri(tag, g, i), buf.getvalue(), ctx.storage_cfg)
    return len(rows)


def _verify_group(group, ctx: Context, evals: list):
    """Verify the pairs of one group: (g, a rows, b rows, view cosines, views, evaluation set of each pair (-1: a
    pair of training images)). b is always a training row; a is a training row, or a row of its evaluation set.
    Returns (scores, transforms)."""
    from cytoray.features.fingerprint import empty_fingerprints

    g, rows_a, rows_b, sim, view, eset, tag = group
    fs, path = storage.filesystem(ctx.pairs_uri(tag, g), ctx.storage_cfg)
    found = storage.with_retries(lambda: sorted(fs.find(path)), ctx.storage_cfg, f"list verification group {g}")
    parts: dict[str, list] = {}
    for f in found:
        z = np.load(io.BytesIO(storage.with_retries(lambda f=f: fs.cat_file(f), ctx.storage_cfg, f"read {f}")))
        for k in z.files:
            parts.setdefault(k, []).append(z[k])
    if not parts:
        parts = {"rows": [np.zeros(0, np.int64)], **{k: [v] for k, v in empty_fingerprints().items()}}
    rows = np.concatenate(parts.pop("rows"))
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    train = {k: np.concatenate(v)[order] for k, v in parts.items()}  # this group's training images, by row
    pos_b = np.searchsorted(rows, rows_b)
    scores = np.full(len(rows_a), np.nan, np.float32)
    trans = np.zeros((len(rows_a), 5), np.float32)
    for e in np.unique(eset).tolist():
        sel = np.flatnonzero(eset == e)
        if e < 0:
            pairs = D.verify(train, np.searchsorted(rows, rows_a[sel]), pos_b[sel], sim[sel], view[sel])
        else:
            pairs = D.verify(evals[e], rows_a[sel], pos_b[sel], sim[sel], view[sel], prints_b=train)
        scores[sel], trans[sel] = pairs.score, pairs.transform
    return scores, trans


def _keys(shard, ctx: Context, positions: np.ndarray):
    _, i, a, b = shard
    lo, hi = np.searchsorted(positions, [a, b])
    if lo == hi:
        return None
    t = read_rows(ctx.ingested, a, b, KEY_COLUMNS, ctx.storage_cfg)
    return t.take(positions[lo:hi] - a)


def _write_kept(shard, ctx: Context, keep_bits: np.ndarray, out: str) -> dict:
    import pyarrow as pa

    _, i, a, b = shard
    keep = np.unpackbits(keep_bits, count=ctx.ingested.rows).astype(bool)[a:b]
    t = read_rows(ctx.ingested, a, b, None, ctx.storage_cfg).filter(pa.array(keep))
    write_part(out, i, t, ctx.storage_cfg)
    return Counter(t.column("dataset").to_pylist())


def rank_rows(keys, priority: list[str]) -> np.ndarray:
    """Keep-policy rank (``dedup.keep_order``) of the rows of a key table, vectorised."""
    ds = keys.column("dataset").to_pylist()
    prio = {d: r for r, d in enumerate(priority)}
    order = np.lexsort((np.array(keys.column("image_id").to_pylist(), dtype=str),
                        np.array([prio.get(d, len(priority)) for d in ds]),
                        -(np.asarray(keys.column("width").to_numpy(zero_copy_only=False), np.int64)
                          * np.asarray(keys.column("height").to_numpy(zero_copy_only=False), np.int64)),
                        keys.column("cell_type").is_null().to_numpy(zero_copy_only=False)))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _eval_sets(cfg: D.DedupConfig, embed_cfg, storage_cfg) -> list[tuple[str, list[str], dict]]:
    """(``eval:<manifest>``, image ids, fingerprints) of every non-empty evaluation manifest, embedded here."""
    from cytoray.curation.embed import embed_rows
    from cytoray.features.fingerprint import fingerprints_of_table

    out = []
    for uri in cfg.eval_manifests:
        rows = D.read_eval_manifest(uri, storage_cfg)
        if rows.num_rows:
            out.append((f"eval:{uri}", rows.column("image_id").to_pylist(),
                        fingerprints_of_table(embed_rows(rows, embed_cfg, storage_cfg))))
    return out


def _leakage_candidates(ctx: Context, shards, lists, probe: int, eval_sets, cfg: D.DedupConfig, go: dict):
    """Leakage candidates (eval row, training row, cosine, view, eval set), searched both ways: training shards against
    each evaluation set, and each evaluation set against the index as one more query; then the index bytes that
    query read."""
    if not eval_sets or not ctx.ingested.rows:
        return [np.zeros(0, t) for t in (np.int64, np.int64, np.float32, np.int8, np.int64)] + [0]
    views = [e[2]["views"] for e in eval_sets]
    per_shard = map_shards(_cross_shard, shards, ctx, views, cfg, desc="leakage guard: candidates", **go)
    back = map_shards(_search, [("eval", j) for j in range(len(eval_sets))], ctx, lists, probe, None, views, cfg,
                      desc="leakage guard: candidates (evaluation images)", ray_tasks=go["ray_tasks"], cfg=go["cfg"])
    out = []
    for j in range(len(eval_sets)):
        e2, t2, s2, v2, _ = back[j]
        t = np.concatenate([r[j][0] for r in per_shard] + [t2])
        e = np.concatenate([r[j][1] for r in per_shard] + [e2])
        s = np.concatenate([r[j][2] for r in per_shard] + [s2])
        v = np.concatenate([r[j][3] for r in per_shard] + [v2])
        e, t, s, v = D._merge_candidates(e, t, s, v)
        out.append((e, t, s, v, np.full(len(e), j, np.int64)))
    return [np.concatenate(x) for x in zip(*out)] + [sum(r[4] for r in back)]


def _verify_all(ctx: Context, shards, pairs_a, pairs_b, sim, view, eset, eval_sets, cfg: D.DedupConfig, go: dict,
                tag: str = "candidates"):
    """Scores and transforms of every candidate pair (the scatter and verify passes, module docstring); ``tag`` names
    the round (its staging directory)."""
    n = len(pairs_a)
    if not n:
        return np.zeros(0, np.float32), np.zeros((0, 5), np.float32)
    if cfg.verify_pairs < 1:
        raise ValueError(f"curation dedup.verify_pairs={cfg.verify_pairs} must be >= 1")
    order = np.lexsort((pairs_b, pairs_a, eset))  # leakage pairs by set, then training pairs; by rows within
    group = np.empty(n, np.int64)
    group[order] = np.arange(n) // cfg.verify_pairs
    # each group needs the training rows of its pairs: b always, a for training pairs
    need_rows = np.concatenate([pairs_b, pairs_a[eset < 0]])
    need_group = np.concatenate([group, group[eset < 0]])
    key = np.unique(need_group * (ctx.ingested.rows + 1) + need_rows)  # (group, row) once each
    need_group, need_rows = key // (ctx.ingested.rows + 1), key % (ctx.ingested.rows + 1)
    by_row = np.argsort(need_rows, kind="stable")
    need_group, need_rows = need_group[by_row], need_rows[by_row]
    jobs = []
    for shard in shards:
        lo, hi = np.searchsorted(need_rows, [shard[2], shard[3]])
        jobs.append((shard, need_rows[lo:hi], need_group[lo:hi], tag))
    map_shards(_scatter, jobs, ctx, desc="dedup: verification data", ray_tasks=go["ray_tasks"], cfg=go["cfg"],
               rows=lambda j: len(j[1]))
    groups = [(g, pairs_a[sel], pairs_b[sel], sim[sel], view[sel], eset[sel], tag)
              for g, sel in enumerate(np.split(order, np.arange(cfg.verify_pairs, n, cfg.verify_pairs)))]
    evals = [e[2] for e in eval_sets]
    found = map_shards(_verify_group, groups, ctx, evals, desc="dedup: verify candidate pairs",
                       ray_tasks=go["ray_tasks"], cfg=go["cfg"], rows=lambda g_: len(g_[1]), unit="pairs")
    scores = np.full(n, np.nan, np.float32)
    trans = np.zeros((n, 5), np.float32)
    for idx, (s, t) in zip(np.split(order, np.arange(cfg.verify_pairs, n, cfg.verify_pairs)), found):
        scores[idx], trans[idx] = s, t
    return scores, trans


def _decide(keys, involved: np.ndarray, leaked: np.ndarray, hits: dict, multi: np.ndarray, edges: D.Pairs,
            cfg: D.DedupConfig) -> tuple[np.ndarray, list[dict]]:
    """(keep mask over every row, duplicate rows) from the keep-policy ``keys`` of the ``involved`` rows (those
    sharing a 64-bit pixel hash (``multi``), with a verified edge, or leaked), by ``dedup.resolve``."""
    ids = keys.column("image_id").to_pylist() if keys is not None else []
    datasets = keys.column("dataset").to_pylist() if keys is not None else []
    dups: list[dict] = []
    for r in sorted(hits):
        li = int(np.searchsorted(involved, r))
        eval_id, name, v, how = hits[r]
        dups.append({"image_id": ids[li], "duplicate_of": eval_id, "similarity": float(v), "reason": "leakage",
                     "dataset": datasets[li], "duplicate_of_dataset": name, "transform": how})
    keep = ~leaked
    rest = np.flatnonzero(~leaked[involved])  # positions in ``involved`` of rows that take part in dedup
    if not len(rest):
        return keep, dups
    sub = keys.take(rest)
    rank = rank_rows(sub, cfg.dataset_priority)
    rep = np.arange(len(rest))
    full = sub.column("pixel_sha256").to_pylist()
    groups: dict[str, list[int]] = {}
    for j in np.flatnonzero(np.isin(involved[rest], multi)).tolist():  # exact copies: the same full pixel hash
        groups.setdefault(full[j], []).append(j)
    for idx in map(np.array, groups.values()):
        if len(idx) > 1:
            rep[idx] = idx[np.argmin(rank[idx])]
    pos = involved[rest]
    local = edges._replace(a=np.searchsorted(pos, edges.a), b=np.searchsorted(pos, edges.b))
    kept, dup_of, sim, exact = D.resolve(rank, rep, local.a, local.b, local.score)
    sub_ids, sub_ds = sub.column("image_id").to_pylist(), sub.column("dataset").to_pylist()
    index = {k: i for i, k in enumerate(sub_ids)}
    for d in D.duplicate_rows(sub_ids, kept, dup_of, sim, exact, local):
        dups.append({**d, "dataset": sub_ds[index[d["image_id"]]],
                     "duplicate_of_dataset": sub_ds[index[d["duplicate_of"]]]})
    keep[pos[~kept]] = False
    log.info("dedup: %d images, %d duplicates (%d exact)", len(leaked) - len(hits), int((~kept).sum()),
             int(exact.sum()))
    return keep, dups


def run(run_, cfg: D.DedupConfig, embed_cfg, scale: ScaleConfig | None, storage_cfg) -> dict:
    """The dedup stage body (:func:`run_dedup`)."""
    import pyarrow as pa

    from cytoray.features.fingerprint import VIEWS
    from cytoray.manifest import DUPLICATES_SCHEMA

    D.check_config(cfg)
    scale = scale or ScaleConfig()
    ing, emb = layout(run_.uri("ingested.parquet"), storage_cfg), layout(run_.uri("embeddings.parquet"), storage_cfg)
    n = ing.rows
    if emb.rows != n:
        raise AssertionError(f"embeddings.parquet has {emb.rows} rows, ingested.parquet {n}; rerun the embed stage "
                             "(force=true)")
    ray_tasks = use_ray(scale, n)
    ranges = ing.ranges(scale.shard_rows)
    shards = [("shard", i, a, b) for i, (a, b) in enumerate(ranges)]
    nlist = D.list_count(n, cfg)
    ctx = Context(ing, emb, run_.staging, storage_cfg, nlist, max(1, -(-n // max(1, cfg.partition_rows))))
    go = dict(ray_tasks=ray_tasks, cfg=scale, rows=lambda s: s[3] - s[2])

    # scan, lists per view, route (the index)
    sample = D.coarse_sample(n, nlist) if nlist > 1 else np.zeros(0, np.int64)
    pool, invariant = cfg.route_pool, cfg.invariant_routing
    scanned = map_shards(_scan, shards, ctx, sample, pool, invariant, desc="dedup: scan", **go)
    sha = np.concatenate([r["sha"] for r in scanned]) if scanned else np.zeros(0, np.uint64)
    images = Counter()
    for r in scanned:
        images.update(r["datasets"])
    lists: list = [None] * len(VIEWS)
    if nlist > 1:
        import faiss

        for v in range(len(VIEWS)):
            lists[v] = faiss.serialize_index(D._kmeans_lists(
                np.concatenate([r["samples"][v] for r in scanned if r["samples"][v] is not None]), nlist))
    del scanned
    map_shards(_route, shards, ctx, lists, pool, invariant, desc="dedup: index", **go)
    probe = min(cfg.list_probe, nlist)

    # candidates: the leakage guard's over every image, then near duplicates among the rest
    eval_sets = _eval_sets(cfg, embed_cfg, storage_cfg)
    le, lt, ls, lv, lset, index_read = _leakage_candidates(ctx, shards, lists, probe, eval_sets, cfg, go)
    na = nb = np.zeros(0, np.int64)
    ns, nv = np.zeros(0, np.float32), np.zeros(0, np.int8)
    groups = query_groups(shards, cfg.search_rows, scale)
    if cfg.near and n > 1:
        found = map_shards(_search, groups, ctx, lists, probe, None, [], cfg,
                           desc="dedup: near-duplicate candidates", **go)
        index_read += sum(r[4] for r in found)
        q, m, s, v = (np.concatenate(x) for x in zip(*(r[:4] for r in found)))
        na, nb, ns, nv = D._merge_candidates(np.minimum(q, m), np.maximum(q, m), s, v)

    # verification of every candidate pair (leakage pairs first: their a is an evaluation row)
    pa_ = np.concatenate([le, na])
    pb_ = np.concatenate([lt, nb])
    eset = np.concatenate([lset, np.full(len(na), -1, np.int64)])
    scores, trans = _verify_all(ctx, shards, pa_, pb_, np.concatenate([ls, ns]), np.concatenate([lv, nv]), eset,
                                eval_sets, cfg, go)
    leak_pairs = D.Pairs(le, lt, ls, lv, scores[:len(le)], trans[:len(le)])
    near_pairs = D.Pairs(na, nb, ns, nv, scores[len(le):], trans[len(le):])

    hits: dict[int, tuple[str, str, float, str]] = {}
    for k in np.flatnonzero(leak_pairs.verified(cfg.leakage_threshold)).tolist():
        t, v = int(leak_pairs.b[k]), float(leak_pairs.score[k])
        if t not in hits or v > hits[t][2]:
            name, eval_ids, _ = eval_sets[int(lset[k])]
            hits[t] = (eval_ids[int(leak_pairs.a[k])], name, v, D.transform_text(leak_pairs, k, removed_is_a=False))
    if eval_sets:
        log.info("leakage guard: %d training images dropped as copies of %d evaluation images", len(hits),
                 sum(len(e[1]) for e in eval_sets))
    leaked = np.zeros(n, bool)
    leaked[list(hits)] = True

    # exact copies: rows (not leaked) whose 64-bit hash is shared; confirmed on the full hash below
    multi = np.zeros(0, np.int64)
    if cfg.exact:
        cand = np.flatnonzero(~leaked)
        _, inv, counts = np.unique(sha[cand], return_inverse=True, return_counts=True)
        multi = cand[counts[inv] > 1]
    # groups linked through verified edges: every member also verified against the group's first image (what the
    # no-chaining rule needs when copies of one picture proposed each other; ``dedup.component_pairs``)
    linked = near_pairs.take(near_pairs.verified(cfg.threshold) & ~leaked[near_pairs.a] & ~leaked[near_pairs.b])
    rows = np.unique(np.concatenate([linked.a, linked.b]))
    if len(rows):
        got = [t for t in map_shards(_keys, shards, ctx, rows, desc="dedup: keys of linked images", **go)
               if t is not None]
        rank = np.zeros(n, np.int64)
        rank[rows] = rank_rows(pa.concat_tables(got), cfg.dataset_priority)
        xa, xb = D.component_pairs(rank, linked.a, linked.b)
        if len(xa):
            none = np.full(len(xa), np.nan, np.float32)
            views = np.full(len(xa), -1, np.int8)
            xs, xt = _verify_all(ctx, shards, xa, xb, none, views, np.full(len(xa), -1, np.int64), eval_sets, cfg,
                                 go, tag="linked")
            near_pairs = D.Pairs.concat([near_pairs, D.Pairs(xa, xb, none, views, xs, xt)])
    ok = near_pairs.verified(cfg.threshold) & ~leaked[near_pairs.a] & ~leaked[near_pairs.b]
    edges = near_pairs.take(ok)

    # decisions on the rows that matter
    involved = np.unique(np.concatenate([multi, edges.a, edges.b, np.flatnonzero(leaked)]).astype(np.int64))
    got = [t for t in map_shards(_keys, shards, ctx, involved, desc="dedup: keys", **go) if t is not None]
    keep, dups = _decide(pa.concat_tables(got) if got else None, involved, leaked, hits, multi, edges, cfg)

    # outputs
    out = run_.uri("deduplicated.parquet")
    remove(out, storage_cfg)  # a file (this process) or a directory of parts (Ray tasks) from an earlier run
    if ray_tasks:
        counts = map_shards(_write_kept, shards, ctx, np.packbits(keep), out, desc="dedup: write", **go)
        kept = sum(counts, Counter())
    else:
        table = read_rows(ing, 0, n, None, storage_cfg).filter(pa.array(keep))
        run_.publish("deduplicated.parquet", table)
        kept = Counter(table.column("dataset").to_pylist())
    run_.publish("duplicates.parquet", pa.Table.from_pylist(dups, schema=DUPLICATES_SCHEMA))
    publish_mask(run_, KEPT_MASK, keep)
    return summarize(cfg, images, kept, dups, ray_tasks, len(shards), nlist, len(groups),
                     verification_summary(near_pairs, leak_pairs, cfg), index_read)


def verification_summary(near: D.Pairs, leakage: D.Pairs, cfg: D.DedupConfig) -> dict:
    """Counts and score histograms of the verified candidate pairs, for summary.json and the report: per kind of pair,
    candidates, verified (score >= its threshold), kept apart (below it), no alignment (rejected before scoring),
    unverifiable (NaN)."""
    from cytoray.curation.verification import NO_ALIGNMENT

    out = {"score_bins": SCORE_BINS.round(3).tolist()}
    for name, pairs, threshold in (("near", near, cfg.threshold), ("leakage", leakage, cfg.leakage_threshold)):
        s = pairs.score
        unaligned = s == NO_ALIGNMENT
        finite = np.isfinite(s) & ~unaligned
        verified = finite & (s >= threshold)
        out[name] = {"candidates": int(len(s)), "verified": int(verified.sum()),
                     "kept_apart": int((finite & ~verified).sum()), "no_alignment": int(unaligned.sum()),
                     "unverifiable": int(np.isnan(s).sum()), "threshold": threshold,
                     "histogram_verified": np.histogram(np.clip(s[verified], -1, 1), SCORE_BINS)[0].tolist(),
                     "histogram_kept_apart": np.histogram(np.clip(s[finite & ~verified], -1, 1), SCORE_BINS)[0].tolist()}
    return out


def summarize(cfg: D.DedupConfig, images: Counter, kept: Counter, dups: list[dict], ray_tasks: bool, shards: int,
              nlist: int, search_tasks: int, verification: dict, index_bytes_read: int = 0) -> dict:
    """The stage summary; fails when a dataset's images != kept + duplicates."""
    per: dict[str, dict] = {}
    for name in sorted(images):
        mine = [d for d in dups if d["dataset"] == name]
        per[name] = {"images": int(images[name]), "kept": int(kept.get(name, 0)), "duplicates": len(mine),
                     "exact": sum(d["reason"] == "exact" for d in mine),
                     "near": sum(d["reason"] == "near_duplicate" for d in mine),
                     "leakage": sum(d["reason"] == "leakage" for d in mine),
                     "cross_dataset": sum(d["dataset"] != d["duplicate_of_dataset"] and d["reason"] != "leakage"
                                          for d in mine)}
        if per[name]["images"] != per[name]["kept"] + per[name]["duplicates"]:
            raise AssertionError(f"dedup accounting broken for {name}: {per[name]}")
    total = {k: sum(d[k] for d in per.values()) for k in ("images", "kept", "duplicates", "exact", "near",
                                                            "leakage", "cross_dataset")}
    return {"stage": "dedup", "threshold": cfg.threshold, "leakage_threshold": cfg.leakage_threshold,
            "candidate_threshold": cfg.candidate_threshold, "candidates_per_view": cfg.candidates,
            "datasets": per, "total": total, "eval_manifests": list(cfg.eval_manifests),
            "verification": verification,
            "search": {"lists": nlist, "routing": cfg.routing, "shards": shards, "search_tasks": search_tasks,
                       "ray_tasks": ray_tasks, "index_bytes_read": int(index_bytes_read),
                       "index_bytes_read_per_image": round(index_bytes_read / max(1, total["images"]), 1)}}


def run_dedup(out_uri: str, cfg: D.DedupConfig, storage_cfg=None, force: bool = False, embed_cfg=None,
              scale=None) -> dict:
    """Dedup stage: ``ingested.parquet`` + ``embeddings.parquet`` -> ``deduplicated.parquet`` (kept rows) and
    ``duplicates.parquet`` (every removed image, the one it duplicates, verified score, reason, transform), with the
    leakage guard against ``cfg.eval_manifests`` (embedded with ``embed_cfg``, the run's embed settings).
    Reconciles per dataset: images in == kept + duplicates (incl. leakage) (the run fails otherwise)."""
    from cytoray.curation.embed import EmbedConfig
    from cytoray.curation.stage import run_stage

    embed_cfg = embed_cfg or EmbedConfig()
    D.check_config(cfg)  # bad settings fail before any stage state changes
    return run_stage("dedup", out_uri, cfg, lambda stage_run: run(stage_run, cfg, embed_cfg, scale, storage_cfg),
                     storage_cfg, force)
