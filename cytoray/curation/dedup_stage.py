"""The dedup stage over shards of the stage files: the rules of ``curation.dedup`` with a driver whose memory does
not grow with the images' payload.

Every pass below is one function over row-range shards (``curation.shards``), run as Ray tasks or in this
process (``scale.mode``); both run the same code on the same shards, so they give the same duplicates.

1. **scan**: per shard, a 64-bit hash of each image's pixel hash, its dataset, and for each view the route rows of
   the coarse k-means sample (``dedup.coarse_sample``: the same rows the in-memory search trains on).
2. The driver trains the coarse lists of each view (k-means centroids) on that sample; up to ``dedup.flat_max``
   images there is one list and the search is exact. It groups the lists into partitions of about
   ``dedup.partition_rows`` images (``partition_lists``: lists that an image's flips/rotations probe together
   share one, so an image's row goes to ~2 partitions, not to all of them).
3. **The candidate search is a join** (each index partition read once per pass, so data moved per image does not
   grow with N):
   - **route** (per shard and view): each image's home list → its compact row (int8 row and scale, 1,040 bytes
     with its row id and list) to ``index/v<view>/p<partition>/s<shard>.npz``; the lists its 8 flips/rotations
     probe (``list_probe`` each) → its row, once per partition they fall in, with the probes there, to
     ``queries/v<view>/p<partition>/s<shard>.npz``. The evaluation sets' images (leakage guard) are routed the
     same way (``e<set>.npz``).
   - **compare** (per view and partition): the partition's index rows are loaded once; each query file routed
     to it is compared with the lists it probes (``dedup.search_members``: one int8 product per list); each
     query variant keeps its ``dedup.candidates`` best above ``dedup.candidate_threshold``, written per query
     shard to ``found/v<view>/s<shard>/p<partition>.npz`` (evaluation queries' come back to the driver).
   - **reduce** (per query shard): each image's best partners over all partitions and variants, per view.
   Each training shard is also searched against the (in-memory) evaluation sets: the leakage guard both ways.
4. **verify**: the candidate pairs are cut into groups of ``dedup.verify_pairs``; a scatter pass over the shards
   writes the fingerprints of each group's images to the staging directory (one file per group and shard), and one
   task per group reads them and verifies its pairs (``verification.verify_pairs``). Only what a pair needs travels:
   no task reads the whole collection.
5. The driver resolves the keep decisions (``dedup.resolve``) on the rows that matter — rows sharing a pixel
   64-bit hash and rows with a verified edge — after fetching just their keep-policy keys (**keys**).
6. **write**: ``deduplicated.parquet`` (one file here; a directory of part files from Ray tasks),
   ``duplicates.parquet``, and ``kept_rows.npy`` (one bit per ingested row) for the stages after.

Every task writes whole files under fixed names and returns which; the next step reads exactly those, so a task
retried on another node (a node lost) is read once, from its successful attempt: nothing lost or counted twice. The summary's ``search`` records what the join moved (bytes written and read:
index, routed queries, per-partition candidates; partitions an image's row went to).

The driver holds 8 bytes per image (the 64-bit hash) plus the coarse sample, the candidate pairs (about 1.6 per
image, 45 bytes each) and the involved rows' keys. A compare task holds one index partition (~1 KB per image)
and one routed query file; a reduce task one shard's per-partition candidates; a verification task its pairs'
fingerprints (11.3 KB per image).
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
    balanced_groups,
    layout,
    map_shards,
    publish_mask,
    read_rows,
    remove,
    task_slots,
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
    list_part: tuple  # per view, (nlist,) partition of each list (``partition_lists``)

    def part_uri(self, view: int, partition: int, shard: int) -> str:
        return storage.join_uri(self.staging, "index", f"v{view}", f"p{partition:05d}", f"s{shard:05d}.npz")

    def query_uri(self, view: int, partition: int, name: str) -> str:
        return storage.join_uri(self.staging, "queries", f"v{view}", f"p{partition:05d}", f"{name}.npz")

    def found_uri(self, view: int, shard: int, partition: int) -> str:
        return storage.join_uri(self.staging, "found", f"v{view}", f"s{shard:05d}", f"p{partition:05d}.npz")

    def pairs_uri(self, tag: str, group: int, shard: int) -> str:
        """A verification group's file from one shard; ``tag`` names the round."""
        return storage.join_uri(self.staging, "verify", tag, f"g{group:05d}", f"s{shard:05d}.npz")


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


def partition_lists(lists, sample: np.ndarray, partitions: int, probe: int, invariant: bool = False,
                    slack: float = 1.5, sweeps: int = 8) -> np.ndarray:
    """(nlist,) partition of each list of one view, chosen so that the lists an image's 8 flips/rotations probe
    fall in few partitions: the join sends an image's row to each partition its probes touch, so this number is
    the search's data moved per image (benchmarks/RESULTS.md, "Join search").

    ``sample``: route rows of the coarse sample (what the lists were trained on); its images' probes stand for
    the collection's. 1. Each list's key is its centroid summed over the 8 flips/rotations (every variant of an
    image has the same key, and the lists its variants probe have keys near it); a spherical k-means groups the
    keys into ``partitions`` and each list goes to its nearest group with room (``slack`` × the mean partition
    size, sizes estimated from the sample; the emptiest group when none has room), lists surest of their group
    first. 2. ``sweeps`` passes of label
    propagation on the lists' co-probe graph (two lists linked by every sample image that probes both): a list
    moves to the partition holding most of its links when that one has room (a partition left empty is dropped,
    so there may be fewer than ``partitions``). Sizes are estimates (the sample's images per list): a partition
    holds about ``slack`` × ``dedup.partition_rows`` images at most, not exactly. On 100,000 images (400 lists,
    20 partitions) an image's probes touch 10.1 partitions with contiguous list ranges, 2.8 after step 1, 2.2
    after step 2."""
    import faiss
    import scipy.sparse as sp

    nlist = lists.ntotal
    if partitions <= 1 or nlist <= 1:
        return np.zeros(max(1, nlist), np.int32)
    partitions = min(partitions, nlist)
    probes = D.Router(lists, invariant).probe(np.ascontiguousarray(sample, np.float32), probe)
    probes = probes.reshape(len(sample), -1)
    sizes = np.bincount(probes[:, 0], minlength=nlist) + 1.0  # variant 0's nearest list: the image's home
    keys = D.route_rows(lists.reconstruct_n(0, nlist), 1, invariant=True)
    km = faiss.Kmeans(keys.shape[1], partitions, niter=20, seed=1234, spherical=True, verbose=False,
                      max_points_per_centroid=nlist, min_points_per_centroid=1)
    km.train(keys)
    centres = np.ascontiguousarray(km.centroids.T)
    surest = np.concatenate([(keys[a:a + 4096] @ centres).max(axis=1) for a in range(0, nlist, 4096)])
    cap = slack * sizes.sum() / partitions
    load = np.zeros(partitions)
    out = np.empty(nlist, np.int32)
    for c in np.argsort(-surest, kind="stable").tolist():  # one row of similarities at a time: O(nlist) memory
        pref = np.argsort(-(keys[c] @ centres), kind="stable")
        room = np.flatnonzero(load[pref] + sizes[c] <= cap)
        p = int(pref[room[0]]) if len(room) else int(np.argmin(load))  # full everywhere: the emptiest
        out[c] = p
        load[p] += sizes[c]
    incidence = sp.csr_matrix((np.ones(probes.size, np.float32), (np.repeat(np.arange(len(probes)), probes.shape[1]),
                                                                  probes.ravel())), shape=(len(probes), nlist))
    incidence.data[:] = 1.0  # an image probing a list twice links it once
    links = (incidence.T @ incidence).tocsr()
    links.setdiag(0)
    links.eliminate_zeros()
    rng = np.random.default_rng(1234)
    for _ in range(sweeps):
        moved = 0
        for c in rng.permutation(nlist).tolist():
            lo, hi = links.indptr[c], links.indptr[c + 1]
            gain = np.bincount(out[links.indices[lo:hi]], weights=links.data[lo:hi], minlength=partitions)
            here = out[c]
            gain[(load + sizes[c] > cap) & (np.arange(partitions) != here)] = -1.0
            best = int(np.argmax(gain))
            if best != here and gain[best] > gain[here]:
                load[here] -= sizes[c]
                load[best] += sizes[c]
                out[c] = best
                moved += 1
        if not moved:
            break
    return np.unique(out, return_inverse=True)[1].astype(np.int32)  # partitions a list left empty: none


def _write_queries(ctx: Context, view: int, queries: D.Prints, probes: np.ndarray, rows: np.ndarray,
                   name: str) -> tuple[int, int, list[int]]:
    """The join's route step for one view of some query images: for every partition that their variants' probed
    lists (``probes`` (n, 8, probe)) fall in, the images that probe it with their compact rows and the probes
    inside it (-1 elsewhere), as ``queries/v<view>/p<partition>/<name>.npz``. Returns (query rows written,
    bytes, partitions written)."""
    part = np.where(probes >= 0, ctx.list_part[view][np.maximum(probes, 0)], -1)
    arrays = queries.arrays(compact=True)
    written = nbytes = 0
    parts = np.unique(part[part >= 0]).tolist()
    for p in parts:
        hit = part == p
        sel = np.flatnonzero(hit.any(axis=(1, 2)))
        buf = io.BytesIO()
        np.savez(buf, rows=rows[sel], probes=np.where(hit[sel], probes[sel], -1).astype(np.int32),
                 **{k: x[sel] for k, x in arrays.items()})
        storage.write_bytes(ctx.query_uri(view, p, name), buf.getvalue(), ctx.storage_cfg)
        written, nbytes = written + len(sel), nbytes + buf.tell()
    return written, nbytes, parts


def _probes(index, queries: D.Prints, probe: int, pool: int, invariant: bool) -> np.ndarray:
    """(n, 8, probe) lists each flip/rotation of each image probes (one list, 0, for the exact search)."""
    if index is None:
        return np.zeros((len(queries), 8, 1), np.int64)
    return D._probe_lists(index, queries, probe, pool, invariant)


def _route(shard, ctx: Context, lists: list, probe: int, pool: int, invariant: bool, queries: bool = True) -> dict:
    """The join's route step for one shard, per view: each image's home list (the index, written by partition:
    ``index/v<view>/p<partition>/s<shard>.npz``, compact rows) and, with ``queries`` (near-duplicate search on),
    the lists its 8 flips/rotations probe (``_write_queries``). Returns which files it wrote (the steps after
    read exactly those: a retried attempt's files replace the first's, and a file only the first wrote is never
    read) and their bytes."""
    _, i, a, b = shard
    _, prints = _fingerprints(ctx, a, b, views_only=True)
    out = {"index": [], "queries": [], "query_rows": 0, "query_bytes": 0, "index_bytes": 0}
    rows = np.arange(a, b)
    for v, view_lists in enumerate(lists):
        view = D.Prints(np.ascontiguousarray(prints["views"][:, v:v + 1]))
        index = _router(view_lists)
        probes = _probes(index, view, probe, pool, invariant) if queries else None
        if index is None:
            home = np.zeros(b - a, np.int64)
        elif probes is not None:  # the nearest list of variant 0 (as dedup._dihedral_search): no second search
            home = probes[:, 0, 0]
        else:
            home = index.search(D.route_rows(view.exact(np.arange(b - a), 0), pool, invariant), 1)[1][:, 0]
        part = ctx.list_part[v][home]
        arrays = view.arrays(compact=True)
        for p in np.unique(part).tolist():
            sel = np.flatnonzero(part == p)
            buf = io.BytesIO()
            np.savez(buf, rows=rows[sel], home=home[sel].astype(np.int32), **{k: x[sel] for k, x in arrays.items()})
            storage.write_bytes(ctx.part_uri(v, p, i), buf.getvalue(), ctx.storage_cfg)
            out["index_bytes"] += buf.tell()
            out["index"].append((v, p, i))
        if probes is None:
            continue
        q_rows, q_bytes, parts = _write_queries(ctx, v, view, probes, rows, f"s{i:05d}")
        out["query_rows"] += q_rows
        out["query_bytes"] += q_bytes
        out["queries"] += [(v, p, f"s{i:05d}") for p in parts]
    return out


def _route_eval(j: int, ctx: Context, lists: list, probe: int, pool: int, invariant: bool, eval_views: list) -> dict:
    """The route step for evaluation set ``j`` (the leakage guard's evaluation -> collection direction): its
    images are queries of the same join (``queries/v<view>/p<partition>/e<j>.npz``)."""
    views = eval_views[j]
    out = {"index": [], "queries": [], "query_rows": 0, "query_bytes": 0, "index_bytes": 0}
    for v, view_lists in enumerate(lists):
        view = D.Prints(np.ascontiguousarray(views[:, v:v + 1]))
        q_rows, q_bytes, parts = _write_queries(ctx, v, view, _probes(_router(view_lists), view, probe, pool,
                                                                      invariant), np.arange(len(views)), f"e{j:05d}")
        out["query_rows"] += q_rows
        out["query_bytes"] += q_bytes
        out["queries"] += [(v, p, f"e{j:05d}") for p in parts]
    return out


def _read_npz(uri: str, ctx: Context):
    raw = storage.read_bytes(uri, ctx.storage_cfg)
    return np.load(io.BytesIO(raw)), len(raw)


def _load_partition(ctx: Context, view: int, p: int, shards: list[int]):
    """(index rows sorted by list, then row (compact ``dedup.Prints``), their row ids, their lists, bytes read) of
    partition ``p`` of a view, from the files the route step's ``shards`` wrote there."""
    parts: dict[str, list] = {}
    nbytes = 0
    for i in shards:
        z, size = _read_npz(ctx.part_uri(view, p, i), ctx)
        nbytes += size
        for k in z.files:
            parts.setdefault(k, []).append(z[k])
    rows, home = np.concatenate(parts.pop("rows")), np.concatenate(parts.pop("home"))
    order = np.lexsort((rows, home))  # by list; within a list by row, as the in-memory index (ties: the smaller row)
    arrays = {k: np.concatenate(parts.pop(k))[order] for k in list(parts)}  # pieces freed key by key
    return D.Prints.of_arrays(arrays), rows[order], home[order].astype(np.int64), nbytes


def _compare(job, ctx: Context, cfg: D.DedupConfig, evals: int) -> dict:
    """The join's compare step for one (view, partition, the shards whose index rows are in it, the query files
    routed to it): the partition's index rows are read once, then every query file (one per query shard, one per
    evaluation set) is compared with the lists it probes (``dedup.search_members``); each query variant's
    ``cfg.candidates`` best index images in this partition are kept. Training queries' results go to
    ``found/v<view>/s<shard>/p<partition>.npz`` (reduced per shard by ``_reduce``); evaluation queries' come back
    (query row · 8 + variant, index row, estimate) per set. Returns those, the found files written, and the bytes
    read and written."""
    v, p, index_shards, names = job
    out = {"evals": [[] for _ in range(evals)], "found": [], "index_bytes": 0, "query_bytes": 0, "found_bytes": 0}
    if not index_shards or not names:  # nothing to compare: no index rows, or no query probes this partition
        return out
    base, ids, homes, out["index_bytes"] = _load_partition(ctx, v, p, index_shards)
    for name in names:
        z, size = _read_npz(ctx.query_uri(v, p, name), ctx)
        out["query_bytes"] += size
        rows = z["rows"]
        queries = D.Prints.of_arrays({"rows8": z["rows8"], "inv8": z["inv8"]})
        qv, m, s = D.search_members(queries, z["probes"].astype(np.int64), base, ids, homes, cfg.candidates,
                                    cfg.candidate_threshold, same_ids=rows if name[0] == "s" else None)
        top = D._top_per_group(qv, s, m, cfg.candidates)  # each query variant's best in this partition
        qv = rows[qv[top] // 8] * 8 + qv[top] % 8
        if name[0] == "e":
            out["evals"][int(name[1:])].append((qv, m[top], s[top]))
        else:
            buf = io.BytesIO()
            np.savez(buf, qv=qv, m=m[top], s=s[top])
            storage.write_bytes(ctx.found_uri(v, int(name[1:]), p), buf.getvalue(), ctx.storage_cfg)
            out["found"].append((v, int(name[1:]), p))
            out["found_bytes"] += buf.tell()
    return out


def _reduce(job, ctx: Context, views: int, k: int):
    """The join's reduce step for one query shard and the (view, partition) files the compare step wrote for it:
    its images' candidates over every partition, per view: (query row, index row, estimate, view), and the bytes
    read."""
    (_, i, a, b), found = job
    out, nbytes = [], 0
    for v in range(views):
        parts = []
        for p in sorted(p_ for v_, p_ in found if v_ == v):
            z, size = _read_npz(ctx.found_uri(v, i, p), ctx)
            nbytes += size
            parts.append((z["qv"], z["m"], z["s"]))
        if parts:
            q, m, s = D.best_candidates(*(np.concatenate(x) for x in zip(*parts)), k)
            out.append((q, m, s, np.full(len(q), v, np.int8)))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8), nbytes
    return (*(np.concatenate(x) for x in zip(*out)), nbytes)


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
    pair of training images), round, the shards that wrote the group's fingerprints). b is always a training row;
    a is a training row, or a row of its evaluation set. Returns (scores, transforms)."""
    from cytoray.features.fingerprint import empty_fingerprints

    g, rows_a, rows_b, sim, view, eset, tag, writers = group
    parts: dict[str, list] = {}
    for i in writers:  # exactly the files the scatter pass wrote (no listing: nothing a failed attempt left)
        z, _ = _read_npz(ctx.pairs_uri(tag, g, i), ctx)
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


def _leakage_candidates(ctx: Context, shards, eval_sets, eval_found: list, cfg: D.DedupConfig, go: dict):
    """Leakage candidates (eval row, training row, cosine, view, eval set), searched both ways: training shards against
    each evaluation set (``_cross_shard``), and each evaluation set against the collection (its images are queries
    of the join: ``eval_found[j]``, per view the compare step's (query row · 8 + variant, row, estimate))."""
    if not eval_sets or not ctx.ingested.rows:
        return [np.zeros(0, t) for t in (np.int64, np.int64, np.float32, np.int8, np.int64)]
    views = [e[2]["views"] for e in eval_sets]
    per_shard = map_shards(_cross_shard, shards, ctx, views, cfg, desc="leakage guard: candidates", **go)
    out = []
    for j in range(len(eval_sets)):
        back = []
        for v, parts in enumerate(eval_found[j]):
            if parts:
                e2, t2, s2 = D.best_candidates(*(np.concatenate(x) for x in zip(*parts)), cfg.candidates)
                back.append((t2, e2, s2, np.full(len(e2), v, np.int8)))
        t, e, s, v = (np.concatenate([r[j][c] for r in per_shard] + [x[c] for x in back]) for c in range(4))
        e, t, s, v = D._merge_candidates(e, t, s, v)
        out.append((e, t, s, v, np.full(len(e), j, np.int64)))
    return [np.concatenate(x) for x in zip(*out)]


def _join_search(ctx: Context, shards, lists: list, probe: int, eval_sets, cfg: D.DedupConfig, go: dict) -> dict:
    """The candidate search as a join whose data moved per image does not grow with N (module docstring):
    route (per shard: the index and the queries, by partition), compare (per view and partition: its index rows
    read once), reduce (per query shard: each image's best candidates). Each step reads exactly the files the
    step before reported writing. Returns the near-duplicate candidates (a < b, estimate, view), per evaluation
    set and view the compare step's results, and what moved."""
    from cytoray.features.fingerprint import VIEWS

    pool, invariant = cfg.route_pool, cfg.invariant_routing
    near = cfg.near and ctx.ingested.rows > 1
    moved = {k: 0 for k in ("index", "queries", "candidates")}
    out = {"near": (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8)),
           "eval_found": [[[] for _ in VIEWS] for _ in eval_sets], "bytes": dict(moved), "written": dict(moved),
           "compare_tasks": 0, "partitions": [int(x.max()) + 1 for x in ctx.list_part], "query_rows": 0}
    if not near and not eval_sets:
        return out
    routed = map_shards(_route, shards, ctx, lists, probe, pool, invariant, near, desc="dedup: route", **go)
    out["query_rows"] = sum(r["query_rows"] for r in routed)
    eval_views = [e[2]["views"] for e in eval_sets]
    routed += map_shards(_route_eval, list(range(len(eval_sets))), ctx, lists, probe, pool, invariant, eval_views,
                         desc="leakage guard: route evaluation images", ray_tasks=go["ray_tasks"], cfg=go["cfg"])
    index_files: dict[tuple[int, int], list[int]] = {}
    query_files: dict[tuple[int, int], list[str]] = {}
    for r in routed:
        for v, p, i in r["index"]:
            index_files.setdefault((v, p), []).append(i)
        for v, p, name in r["queries"]:
            query_files.setdefault((v, p), []).append(name)
    jobs = [(v, p, sorted(index_files.get((v, p), [])), sorted(query_files.get((v, p), [])))
            for v in range(len(VIEWS)) for p in range(out["partitions"][v])]
    found = map_shards(_compare, jobs, ctx, cfg, len(eval_sets), desc="dedup: compare (per list partition)",
                       ray_tasks=go["ray_tasks"], cfg=go["cfg"])
    out["eval_found"] = [[[x for r, job in zip(found, jobs) if job[0] == v for x in r["evals"][j]]
                          for v in range(len(VIEWS))] for j in range(len(eval_sets))]
    out["written"] = {"index": sum(r["index_bytes"] for r in routed), "queries": sum(r["query_bytes"] for r in routed),
                      "candidates": sum(r["found_bytes"] for r in found)}
    moved["index"], moved["queries"] = sum(r["index_bytes"] for r in found), sum(r["query_bytes"] for r in found)
    if near:
        per_shard: dict[int, list] = {}
        for r in found:
            for v, i, p in r["found"]:
                per_shard.setdefault(i, []).append((v, p))
        got = map_shards(_reduce, [(s, per_shard.get(s[1], [])) for s in shards], ctx, len(VIEWS), cfg.candidates,
                         desc="dedup: candidates per image", ray_tasks=go["ray_tasks"], cfg=go["cfg"],
                         rows=lambda j: j[0][3] - j[0][2])
        moved["candidates"] = sum(r[4] for r in got)
        q, m, s, v = (np.concatenate(x) for x in zip(*(r[:4] for r in got)))
        out["near"] = D._merge_candidates(np.minimum(q, m), np.maximum(q, m), s, v)
    out["bytes"], out["compare_tasks"] = moved, len(jobs)
    return out


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
    group[order] = balanced_groups(n, cfg.verify_pairs, task_slots(go["cfg"], go["ray_tasks"]))
    cuts = np.flatnonzero(np.diff(group[order])) + 1  # where each group starts in ``order``
    # each group needs the training rows of its pairs: b always, a for training pairs
    need_rows = np.concatenate([pairs_b, pairs_a[eset < 0]])
    need_group = np.concatenate([group, group[eset < 0]])
    key = np.unique(need_group * (ctx.ingested.rows + 1) + need_rows)  # (group, row) once each
    need_group, need_rows = key // (ctx.ingested.rows + 1), key % (ctx.ingested.rows + 1)
    by_row = np.argsort(need_rows, kind="stable")
    need_group, need_rows = need_group[by_row], need_rows[by_row]
    jobs = []
    writers: dict[int, list[int]] = {}  # group -> the shards whose scatter task writes a file for it
    for shard in shards:
        lo, hi = np.searchsorted(need_rows, [shard[2], shard[3]])
        jobs.append((shard, need_rows[lo:hi], need_group[lo:hi], tag))
        for g in np.unique(need_group[lo:hi]).tolist():
            writers.setdefault(g, []).append(shard[1])
    map_shards(_scatter, jobs, ctx, desc="dedup: verification data", ray_tasks=go["ray_tasks"], cfg=go["cfg"],
               rows=lambda j: len(j[1]))
    groups = [(g, pairs_a[sel], pairs_b[sel], sim[sel], view[sel], eset[sel], tag, writers.get(g, []))
              for g, sel in enumerate(np.split(order, cuts))]
    evals = [e[2] for e in eval_sets]
    found = map_shards(_verify_group, groups, ctx, evals, desc="dedup: verify candidate pairs",
                       ray_tasks=go["ray_tasks"], cfg=go["cfg"], rows=lambda g_: len(g_[1]), unit="pairs")
    scores = np.full(n, np.nan, np.float32)
    trans = np.zeros((n, 5), np.float32)
    for idx, (s, t) in zip(np.split(order, cuts), found):
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
    go = dict(ray_tasks=ray_tasks, cfg=scale, rows=lambda s: s[3] - s[2])

    # scan, then the lists of each view and their partitions
    sample = D.coarse_sample(n, nlist) if nlist > 1 else np.zeros(0, np.int64)
    pool, invariant = cfg.route_pool, cfg.invariant_routing
    scan_ctx = Context(ing, emb, run_.staging, storage_cfg, nlist, ())
    scanned = map_shards(_scan, shards, scan_ctx, sample, pool, invariant, desc="dedup: scan", **go)
    sha = np.concatenate([r["sha"] for r in scanned]) if scanned else np.zeros(0, np.uint64)
    images = Counter()
    for r in scanned:
        images.update(r["datasets"])
    lists: list = [None] * len(VIEWS)
    list_part = [np.zeros(1, np.int32)] * len(VIEWS)
    if nlist > 1:
        import faiss

        partitions = max(1, -(-n // max(1, cfg.partition_rows)))
        for v in range(len(VIEWS)):
            rows = np.concatenate([r["samples"][v] for r in scanned if r["samples"][v] is not None])
            index = D._kmeans_lists(rows, nlist, closed=D.closed_routing(cfg, nlist))
            list_part[v] = partition_lists(index, rows, partitions, min(cfg.list_probe, nlist), invariant)
            lists[v] = faiss.serialize_index(index)
            trained = index.ntotal  # closed lists: 8 x ceil(nlist / 8)
            del rows
        nlist = trained
    del scanned
    ctx = Context(ing, emb, run_.staging, storage_cfg, nlist, tuple(list_part))
    probe = min(cfg.list_probe, nlist)

    # candidates: the join (near duplicates and the evaluation images' side of the leakage guard), then the
    # training side of the leakage guard
    eval_sets = _eval_sets(cfg, embed_cfg, storage_cfg)
    join = _join_search(ctx, shards, lists, probe, eval_sets, cfg, go)
    le, lt, ls, lv, lset = _leakage_candidates(ctx, shards, eval_sets, join["eval_found"], cfg, go)
    na, nb, ns, nv = join["near"]

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
    return summarize(cfg, images, kept, dups, ray_tasks, len(shards), nlist,
                     verification_summary(near_pairs, leak_pairs, cfg), join)


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
              nlist: int, verification: dict, join: dict) -> dict:
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
            "search": search_summary(cfg, nlist, shards, ray_tasks, total["images"], join)}


def search_summary(cfg: D.DedupConfig, nlist: int, shards: int, ray_tasks: bool, images: int, join: dict) -> dict:
    """What the join search did and moved: lists, partitions per view, compare tasks, query rows routed per image
    and view (how many partitions an image's row goes to), and the bytes its compare and reduce steps read
    (index partitions, routed queries, per-partition candidates), in all and per image."""
    from cytoray.features.fingerprint import VIEWS

    moved = {k: int(v) for k, v in join["bytes"].items()}
    total = sum(moved.values())
    return {"lists": nlist, "routing": cfg.routing, "shards": shards, "ray_tasks": ray_tasks,
            "partitions": join["partitions"], "compare_tasks": join["compare_tasks"],
            "routed_per_image_view": round(join["query_rows"] / max(1, images * len(VIEWS)), 3),
            "bytes_written": {k: int(v) for k, v in join["written"].items()},
            "bytes_read": moved, "bytes_read_total": total,
            "bytes_read_per_image": round(total / max(1, images), 1)}


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
