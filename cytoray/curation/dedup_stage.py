"""The dedup stage over shards of the stage files: the rules of ``curation.dedup`` with a driver whose memory does
not grow with the images' payload.

Every pass below is one function over row-range shards (``curation.shards``), run as Ray tasks or in this
process (``scale.mode``); both run the same code on the same shards, so they give the same duplicates.

1. **scan**: per shard, a 64-bit hash of each image's pixel hash, its dataset, and the zoom-1 fingerprint rows
   of the coarse k-means sample (``dedup.coarse_sample``: the same rows the in-memory search trains on).
2. The driver trains the coarse lists (k-means centroids) on that sample; up to ``dedup.flat_max`` images there
   is one list and the search is exact.
3. **route**: per shard, each image's home list; the zoom-1 thumbnails are written to the stage's staging
   directory by partition (contiguous list ranges of about ``dedup.partition_rows`` images): the index.
4. **search** (leakage guard first when evaluation manifests are given, then near duplicates): per group of
   query shards (``query_groups``), every zoom × flip × rotation of every image probes its ``list_probe`` nearest
   lists; the task loads the index partitions those lists are in, one at a time, and returns only the pairs
   above the threshold (``dedup.search_members``, the in-memory search's own core). Evaluation images are one
   more query shard.
5. The driver resolves the keep decisions (``dedup.resolve``) on the rows that matter — rows sharing a pixel
   64-bit hash and rows with an edge — after fetching just their keep-policy keys (**keys**).
6. **write**: ``deduplicated.parquet`` (one file here; a directory of part files from Ray tasks),
   ``duplicates.parquet``, and ``kept_rows.npy`` (one bit per ingested row) for the stages after.

The driver holds 8 bytes per image (the 64-bit hash) plus the coarse sample, the edges and the involved rows'
keys. Each task holds one shard's (a search task: its group's) fingerprints (3 KB per image, and 3 KB of int8
rows) and one index partition (2 KB per image: the zoom-1 thumbnail and its int8 row, made once by the route
pass).
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

    def part_uri(self, partition: int, shard: int) -> str:
        return storage.join_uri(self.staging, "index", f"p{partition:05d}", f"s{shard:05d}.npz")


def _fingerprints(ctx: Context, a: int, b: int):
    import pyarrow as pa

    from cytoray.features.fingerprint import fingerprints_of_table

    t = read_rows(ctx.embeddings, a, b, ["image_id", "fingerprint"], ctx.storage_cfg)
    ids, thumbs = t.column("image_id").to_pylist(), fingerprints_of_table(t)
    del t
    # Decoding the fingerprint lists leaves ~10x their size in Arrow's memory pool, which keeps it: a search
    # task at 10^6 images peaked 0.8 GiB higher without this.
    pa.default_memory_pool().release_unused()
    return ids, thumbs


def _base_rows(thumbs: np.ndarray) -> np.ndarray:
    """Centred unit zoom-1 rows (what the index holds)."""
    return D._variant_rows(thumbs, D._centring(thumbs[:, :1]), np.arange(len(thumbs)), 0)


def _scan(shard, ctx: Context, sample: np.ndarray, pool: int, invariant: bool) -> dict:
    _, i, a, b = shard
    ing = read_rows(ctx.ingested, a, b, ["image_id", "pixel_sha256", "dataset"], ctx.storage_cfg)
    ids, thumbs = _fingerprints(ctx, a, b)
    if ids != ing.column("image_id").to_pylist():
        raise AssertionError(f"embeddings.parquet rows {a}..{b} do not match ingested.parquet; rerun the embed "
                             "stage (force=true)")
    sha = np.array([int.from_bytes(hashlib.blake2b((h or "").encode(), digest_size=8).digest(), "little")
                    for h in ing.column("pixel_sha256").to_pylist()], np.uint64)
    rows = sample[(sample >= a) & (sample < b)] - a
    return {"sha": sha, "datasets": Counter(ing.column("dataset").to_pylist()),
            "sample": D.route_rows(_base_rows(thumbs[rows]), pool, invariant) if len(rows) else None}


def _router(lists: np.ndarray | None):
    """The lists' index (``dedup._kmeans_lists``) from its serialised bytes (built once, in the driver)."""
    import faiss

    return None if lists is None else faiss.deserialize_index(lists)


def _route(shard, ctx: Context, lists: np.ndarray | None, pool: int, invariant: bool) -> int:
    _, i, a, b = shard
    _, thumbs = _fingerprints(ctx, a, b)
    prints = D.Prints(np.ascontiguousarray(thumbs[:, :1]))  # made once here, not by every query shard's task
    index = _router(lists)
    home = np.zeros(b - a, np.int64) if index is None else \
        index.search(D.route_rows(prints.exact(np.arange(b - a), 0), pool, invariant), 1)[1][:, 0]
    part = ctx.partition_of(home)
    for p in np.unique(part).tolist():
        sel = np.flatnonzero(part == p)
        buf = io.BytesIO()
        np.savez(buf, rows=sel + a, home=home[sel], **{k: v[sel] for k, v in prints.arrays().items()})
        storage.write_bytes(ctx.part_uri(p, i), buf.getvalue(), ctx.storage_cfg)
    return b - a


def _load_partition(ctx: Context, p: int, excluded: np.ndarray | None):
    """(index prints sorted by list (``dedup.Prints``), their row ids, their lists) of index partition ``p``."""
    fs, path = storage.filesystem(storage.join_uri(ctx.staging, "index", f"p{p:05d}"), ctx.storage_cfg)
    found = storage.with_retries(lambda: sorted(fs.find(path)), ctx.storage_cfg, f"list index partition {p}")
    parts: dict[str, list] = {}
    for f in found:  # s<shard>.npz in shard order: one listing, no request per (partition, shard)
        if not f.endswith(".npz"):
            continue
        z = np.load(io.BytesIO(storage.with_retries(lambda f=f: fs.cat_file(f), ctx.storage_cfg, f"read {f}")))
        ok = slice(None) if excluded is None else ~excluded[z["rows"]]
        for k in z.files:
            parts.setdefault(k, []).append(z[k][ok])
    if not parts:
        return None
    rows, home = np.concatenate(parts.pop("rows")), np.concatenate(parts.pop("home"))
    order = np.argsort(home, kind="stable")  # by list; within a list by row (files in shard order)
    arrays = {k: np.concatenate(parts.pop(k))[order] for k in list(parts)}  # pieces freed key by key
    return D.Prints.of_arrays(arrays), rows[order], home[order]  # uint8 thumbnails and int8 rows: 2 KB per image


def _search(query, ctx: Context, lists: np.ndarray | None, probe: int, k: int, threshold: float,
            excluded_bits: np.ndarray | None, eval_thumbs: list[np.ndarray], cfg: D.DedupConfig):
    """Pairs of one query shard: ("shard", i, a, b) -> (row, row, cosine) with row < row among the rows;
    ("eval", j) -> (eval row, row, cosine) for evaluation set j."""
    excluded = None if excluded_bits is None else np.unpackbits(excluded_bits, count=ctx.ingested.rows).astype(bool)
    if query[0] == "shard":
        _, i, a, b = query
        _, thumbs = _fingerprints(ctx, a, b)
        same_ids = np.arange(a, b)
    else:
        thumbs, same_ids = eval_thumbs[query[1]], None
    nv = thumbs.shape[1] * 8
    queries = D.Prints(thumbs)
    index = _router(lists)
    probes = np.zeros((len(thumbs), nv, 1), np.int64) if index is None else \
        D._probe_lists(index, queries, probe, cfg.route_pool, cfg.invariant_routing)
    if same_ids is not None and excluded is not None:
        probes[excluded[same_ids]] = -1
    part = np.where(probes >= 0, ctx.partition_of(probes), -1)
    found = []
    for p in np.unique(part[part >= 0]).tolist():
        loaded = _load_partition(ctx, p, excluded)
        if loaded is None or len(loaded[0]) == 0:
            continue
        base, ids, homes = loaded
        found.append(D.search_members(queries, np.where(part == p, probes, -1), base, ids, homes, k, threshold,
                                      same_ids=same_ids))
        del loaded, base
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    qv, m, s = (np.concatenate(x) for x in zip(*found))
    top = D._top_per_group(qv, s, m, k)
    q = qv[top] // nv
    if same_ids is not None:
        q = same_ids[q]
        return D._best_per_pair(np.minimum(q, m[top]), np.maximum(q, m[top]), s[top])
    return D._best_per_pair(q, m[top], s[top])


def query_groups(shards: list, search_rows: int, scale: ScaleConfig) -> list:
    """The search pass's queries: runs of consecutive shards as one ("shard", group, first row, stop row) each, of
    at most ``search_rows`` rows (at least one shard) and, when there are enough shards, at least
    ``scale.max_in_flight`` groups (``DedupConfig.search_rows``)."""
    if search_rows < 1:
        raise ValueError(f"curation dedup.search_rows={search_rows} must be >= 1")
    per = max(1, min(search_rows // max(1, scale.shard_rows), -(-len(shards) // max(1, scale.max_in_flight))))
    return [("shard", g, shards[j][2], shards[min(len(shards), j + per) - 1][3])
            for g, j in enumerate(range(0, len(shards), per))]


def _cross_shard(shard, ctx: Context, eval_thumbs: list[np.ndarray], k: int, threshold: float, cfg: D.DedupConfig):
    """Leakage guard, training side: this shard's images against each evaluation set (exact or the in-memory
    lists over the evaluation set). Returns per set (training row, eval row, cosine)."""
    _, i, a, b = shard
    _, thumbs = _fingerprints(ctx, a, b)
    out = []
    for ev in eval_thumbs:
        t, e, s = D._dihedral_search(thumbs, ev, k, threshold, cfg, same=False)
        out.append((t + a, e, s))
    return out


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


def _leakage_hits(ctx: Context, shards, lists, probe: int, cfg: D.DedupConfig, embed_cfg, storage_cfg,
                  go: dict) -> dict[int, tuple[str, str, float]]:
    """{training row: (evaluation image id, ``eval:<manifest>``, cosine)} above ``cfg.leakage_threshold``, the
    closest evaluation image over all sets; searched both ways (training shards against each evaluation set, and
    each evaluation set against the index as one more query)."""
    from cytoray.curation.embed import embed_rows
    from cytoray.features.fingerprint import fingerprints_of_table

    eval_sets = []
    for uri in cfg.eval_manifests:
        rows = D.read_eval_manifest(uri, storage_cfg)
        fp = fingerprints_of_table(embed_rows(rows, embed_cfg, storage_cfg))
        eval_sets.append((f"eval:{uri}", rows.column("image_id").to_pylist(), fp))
    eval_sets = [e for e in eval_sets if len(e[1])]
    hits: dict[int, tuple[str, str, float]] = {}
    if not eval_sets or not ctx.ingested.rows:
        return hits
    thumbs = [e[2] for e in eval_sets]
    per_shard = map_shards(_cross_shard, shards, ctx, thumbs, cfg.k, cfg.leakage_threshold, cfg,
                           desc="leakage guard", **go)
    back = map_shards(_search, [("eval", j) for j in range(len(eval_sets))], ctx, lists, probe, cfg.k,
                      cfg.leakage_threshold, None, thumbs, cfg, desc="leakage guard (evaluation images)",
                      ray_tasks=go["ray_tasks"], cfg=go["cfg"])
    for j, (name, eval_ids, _) in enumerate(eval_sets):
        e2, t2, s2 = back[j]
        t, e, s = D._best_per_pair(np.concatenate([r[j][0] for r in per_shard] + [t2]),
                                   np.concatenate([r[j][1] for r in per_shard] + [e2]),
                                   np.concatenate([r[j][2] for r in per_shard] + [s2]))
        for ti, ei, v in zip(t.tolist(), e.tolist(), s.tolist()):
            if ti not in hits or v > hits[ti][2]:
                hits[ti] = (eval_ids[ei], name, v)
    log.info("leakage guard: %d training images dropped as near-copies of %d evaluation images",
             len(hits), sum(len(e[1]) for e in eval_sets))
    return hits


def _decide(keys, involved: np.ndarray, leaked: np.ndarray, hits: dict, multi: np.ndarray, edges,
            cfg: D.DedupConfig) -> tuple[np.ndarray, list[dict]]:
    """(keep mask over every row, duplicate rows) from the keep-policy ``keys`` of the ``involved`` rows (those
    sharing a 64-bit pixel hash (``multi``), with a near edge, or leaked), by ``dedup.resolve``."""
    a, b, s = edges
    ids = keys.column("image_id").to_pylist() if keys is not None else []
    datasets = keys.column("dataset").to_pylist() if keys is not None else []
    dups: list[dict] = []
    for r in sorted(hits):
        li = int(np.searchsorted(involved, r))
        eval_id, name, v = hits[r]
        dups.append({"image_id": ids[li], "duplicate_of": eval_id, "similarity": float(v), "reason": "leakage",
                     "dataset": datasets[li], "duplicate_of_dataset": name})
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
    kept, dup_of, sim, exact = D.resolve(rank, rep, np.searchsorted(pos, a), np.searchsorted(pos, b), s)
    sub_ids, sub_ds = sub.column("image_id").to_pylist(), sub.column("dataset").to_pylist()
    for m in np.flatnonzero(~kept).tolist():
        t = int(dup_of[m])
        dups.append({"image_id": sub_ids[m], "duplicate_of": sub_ids[t], "similarity": float(sim[m]),
                     "reason": "exact" if exact[m] else "near_duplicate", "dataset": sub_ds[m],
                     "duplicate_of_dataset": sub_ds[t]})
    keep[pos[~kept]] = False
    log.info("dedup: %d images, %d duplicates (%d exact)", len(leaked) - len(hits), int((~kept).sum()),
             int(exact.sum()))
    return keep, dups


def run(run_, cfg: D.DedupConfig, embed_cfg, scale: ScaleConfig | None, storage_cfg) -> dict:
    """The dedup stage body (:func:`run_dedup`)."""
    import pyarrow as pa

    from cytoray.manifest import DUPLICATES_SCHEMA

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

    sample = D.coarse_sample(n, nlist) if nlist > 1 else np.zeros(0, np.int64)
    pool, invariant = cfg.route_pool, cfg.invariant_routing
    scanned = map_shards(_scan, shards, ctx, sample, pool, invariant, desc="dedup: scan", **go)
    sha = np.concatenate([r["sha"] for r in scanned]) if scanned else np.zeros(0, np.uint64)
    images = Counter()
    for r in scanned:
        images.update(r["datasets"])
    lists = None
    if nlist > 1:
        import faiss

        lists = faiss.serialize_index(D._kmeans_lists(
            np.concatenate([r["sample"] for r in scanned if r["sample"] is not None]), nlist))
    del scanned
    map_shards(_route, shards, ctx, lists, pool, invariant, desc="dedup: index", **go)
    probe = min(cfg.list_probe, nlist)

    # leakage guard over every image first (module docstring of curation.dedup)
    hits = _leakage_hits(ctx, shards, lists, probe, cfg, embed_cfg, storage_cfg, go)
    leaked = np.zeros(n, bool)
    leaked[list(hits)] = True

    # exact copies: rows (not leaked) whose 64-bit hash is shared; confirmed on the full hash below
    multi = np.zeros(0, np.int64)
    if cfg.exact:
        cand = np.flatnonzero(~leaked)
        _, inv, counts = np.unique(sha[cand], return_inverse=True, return_counts=True)
        multi = cand[counts[inv] > 1]
    a = b = np.zeros(0, np.int64)
    s = np.zeros(0, np.float32)
    groups = query_groups(shards, cfg.search_rows, scale)
    if cfg.near and (~leaked).sum() > 1:
        found = map_shards(_search, groups, ctx, lists, probe, cfg.k,
                           cfg.threshold, np.packbits(leaked) if leaked.any() else None, [], cfg,
                           desc="dedup: near-duplicate search", **go)
        if found:
            a, b, s = (np.concatenate(x) for x in zip(*found))
            a, b, s = D._best_per_pair(a, b, s)  # a pair found from both of its shards once

    # decisions on the rows that matter
    involved = np.unique(np.concatenate([multi, a, b, np.flatnonzero(leaked)]).astype(np.int64))
    got = [t for t in map_shards(_keys, shards, ctx, involved, desc="dedup: keys", **go) if t is not None]
    keep, dups = _decide(pa.concat_tables(got) if got else None, involved, leaked, hits, multi, (a, b, s), cfg)

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
    return summarize(cfg, images, kept, dups, ray_tasks, len(shards), nlist, len(groups))


def summarize(cfg: D.DedupConfig, images: Counter, kept: Counter, dups: list[dict], ray_tasks: bool, shards: int,
              nlist: int, search_tasks: int) -> dict:
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
    return {"stage": "dedup", "threshold": cfg.threshold, "k": cfg.k, "datasets": per, "total": total,
            "leakage_threshold": cfg.leakage_threshold, "eval_manifests": list(cfg.eval_manifests),
            "search": {"lists": nlist, "routing": cfg.routing, "shards": shards, "search_tasks": search_tasks,
                       "ray_tasks": ray_tasks}}


def run_dedup(out_uri: str, cfg: D.DedupConfig, storage_cfg=None, force: bool = False, embed_cfg=None,
              scale=None) -> dict:
    """Dedup stage: ``ingested.parquet`` + ``embeddings.parquet`` -> ``deduplicated.parquet`` (kept rows) and
    ``duplicates.parquet`` (every removed image, the one it duplicates, similarity, reason), then the leakage
    guard against ``cfg.eval_manifests`` (embedded with ``embed_cfg``, the run's embed settings).
    Reconciles per dataset: images in == kept + duplicates (incl. leakage) (the run fails otherwise)."""
    from cytoray.curation.embed import EmbedConfig
    from cytoray.curation.stage import run_stage

    embed_cfg = embed_cfg or EmbedConfig()
    return run_stage("dedup", out_uri, cfg, lambda stage_run: run(stage_run, cfg, embed_cfg, scale, storage_cfg),
                     storage_cfg, force)
