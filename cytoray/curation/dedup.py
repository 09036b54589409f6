"""Deduplication: the leakage guard first, then exact (identical decoded pixels) and near-duplicates (faiss kNN,
cosine above a threshold), within and across datasets. Near-duplicates are searched on instance fingerprints
with flip/rotation/zoom query expansion (``dihedral_knn_edges``) — global colour statistics cannot separate
re-exports from other cells of the same class and source (precision <= 0.41 on the synthetic ground truth,
benchmarks/RESULTS.md) — or on any L2-normalised embedding (``knn_edges``).

1. **Leakage guard** (with ``eval_manifests``, held-out labelled sets): their images are fingerprinted the same
   way and *every* ingested image whose fingerprint similarity to an evaluation image exceeds the stricter
   ``leakage_threshold`` is dropped with ``reason = "leakage"``, ``duplicate_of`` = that evaluation image,
   ``duplicate_of_dataset`` = ``eval:<manifest uri>``. It runs before in-collection dedup, so leakage takes
   precedence: four copies of one evaluation cell are four leakage rows, whichever of them dedup would keep.
2. **Exact duplicates**: per pixel hash, the first image by the keep policy stays; the others are ``exact``.
3. **Near duplicates, without chaining** (the SemDeDup / NeMo rule): images are visited in keep-policy order and
   one is removed only when its similarity to an image *already kept* is above ``threshold``; it is recorded as
   a duplicate of the most similar such image. So A~B and B~C never removes C for A's sake, and every
   ``similarity`` in ``duplicates.parquet`` is a measured pair above the threshold (1.0 for exact copies).

Keep policy, first wins:
1. labelled (``cell_type`` not null) before unlabelled;
2. more pixels (width × height) before fewer (re-exports are usually downscaled);
3. position of its dataset in ``dataset_priority`` (unlisted datasets after listed ones);
4. ``image_id`` (deterministic tie-break).
Every removed image goes to ``duplicates.parquet`` (image_id, duplicate_of, similarity, reason) and
``duplicate_of`` always names an image that is kept (or an evaluation image, for leakage).

Search is exact up to ``flat_max`` index rows and partitioned above it: faiss k-means lists, each query compared
with the rows of its few nearest lists by one dense matrix product per list (int8 with an exact error bound;
pairs near the threshold are measured again in fp32, ``search_members``), so cost grows as N · probe · list size
instead of N². The fingerprint search and the leakage guard (``_dihedral_search``: lists of ~``list_size``
images, ``list_probe`` probed) run this way on CPU; ``knn_edges`` on embeddings runs ``partitioned_edges`` unless
faiss sees a GPU, where it uses a faiss flat or IVF-flat index (``build_index``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

ROUTINGS = ("variant", "invariant")  # DedupConfig.routing


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
    flat_max: int = 5_000  # exact search up to this many index rows, partitioned (or IVF-flat on a GPU) above
    # Partitioned fingerprint search: k-means lists of ~list_size images, each query variant searching its
    # list_probe nearest lists. Cost per image ~ R routing searches over N / list_size centroids (at 1/route_pool²
    # of the row length; R = 24 variants, or 3 zooms with routing=invariant) + 24 · list_probe · list_size rows;
    # at 10,000 images these find every pair the exact search finds (benchmarks/RESULTS.md). 0: the size that
    # balances the two, sqrt(N / list_probe) / route_pool (variant; 645 at 5M, 2,887 at 100M) or
    # sqrt(N / (8 · list_probe)) / route_pool (invariant; 1,021 at 100M), at least 250.
    list_size: int = 0
    list_probe: int = 3
    # How a query variant finds its lists. "variant": each of the 24 zoom × flip × rotation variants on its own
    # route row (exact). "invariant": one search per zoom on a row summed over its 8 flips/rotations
    # (``route_rows``), shared by the 8: routing costs an eighth and the search pass ran 2.6× faster at 10⁶
    # images, but the coarser rows put cropped copies in other lists more often (planted crop recall 0.685 ->
    # 0.559 at 10⁶; benchmarks/RESULTS.md).
    routing: str = "variant"
    # Lists are trained and routed on route_pool×route_pool block means of the thumbnails (16×16 for 32×32: a
    # quarter of routing's work, which grows with the number of lists and dominates from ~10⁶ images on); 1:
    # full thumbnails. 4 (8×8) lost planted copies in tests/curation/test_dedup_parts.py. Recall and time:
    # benchmarks/RESULTS.md.
    route_pool: int = 2
    # Sharded search (curation.dedup_stage): index rows per partition that one search task holds at a time
    # (1 KB each as uint8 zoom-1 thumbnails).
    partition_rows: int = 262_144
    # Query images one search task takes (whole consecutive shards). A task loads every index partition its
    # queries probe (nearly all of them from 10⁶ images on), so reading the index costs O(N) per task: fewer,
    # larger tasks read it fewer times (benchmarks/RESULTS.md). Fewer shards per task when more would leave
    # fewer than ``scale.max_in_flight`` tasks.
    search_rows: int = 131_072
    nprobe: int = 16  # IVF-flat lists probed (embeddings on a GPU)
    use_gpu: bool = True  # knn_edges on embeddings: a faiss GPU index when faiss has GPUs

    @property
    def invariant_routing(self) -> bool:
        return self.routing == "invariant"


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


def coarse_sample(m: int, nlist: int, cap: int = 131_072, seed: int = 1234) -> np.ndarray:
    """Sorted positions of the rows a coarse k-means over ``m`` rows trains on: 64 per list, at most ``cap``.
    Drawn here, not inside faiss, so that every process that holds some of the rows trains on the same ones."""
    size = int(min(m, nlist * 64, cap))
    return np.sort(np.random.default_rng(seed).choice(m, size, replace=False))


def _kmeans_lists(sample: np.ndarray, nlist: int):
    """An inner-product index over the centroids of a faiss spherical k-means of ``sample`` (all of it: the
    caller draws the sample, ``coarse_sample``). Flat: on CPU a BLAS product with every centroid is faster than
    an HNSW graph over them up to 20,000 lists at least, and exact (benchmarks/RESULTS.md)."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    km = faiss.Kmeans(sample.shape[1], nlist, niter=10, seed=1234, spherical=True, verbose=False,
                      max_points_per_centroid=len(sample) // max(1, nlist) + 1, min_points_per_centroid=1)
    km.train(sample)
    index = faiss.IndexFlatIP(sample.shape[1])
    index.add(km.centroids)
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
    n = len(x)
    nlist = max(1, n // list_size)
    _, lists = _kmeans_lists(x[coarse_sample(n, nlist)], nlist).search(x, min(probe, nlist))
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


def _centring(thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, Z) mean and L2 norm after removing it (at least 1e-6) of every thumbnail; the dihedral variants of a
    thumbnail share both. From integer sums of the uint8 pixels (exact), in blocks."""
    flat = thumbs.reshape(thumbs.shape[0], thumbs.shape[1], -1)
    cells = flat.shape[2]
    means, norms = np.zeros(flat.shape[:2], np.float32), np.zeros(flat.shape[:2], np.float32)
    for a in range(0, len(flat), 8192):  # no full-size temporaries
        x = flat[a:a + 8192]
        if x.dtype == np.uint8:
            x = x.astype(np.int32)
            total, squares = x.sum(axis=2, dtype=np.int64), (x * x).sum(axis=2, dtype=np.int64)
            means[a:a + 8192] = total / cells
            norms[a:a + 8192] = np.sqrt(np.maximum(squares - total.astype(np.float64) ** 2 / cells, 0.0))
        else:  # float fingerprints (features.fingerprint before quantisation)
            x = x.astype(np.float64)
            means[a:a + 8192] = x.mean(axis=2)
            norms[a:a + 8192] = np.linalg.norm(x - x.mean(axis=2)[:, :, None], axis=2)
    return means, np.maximum(norms, 1e-6)


def _variant_rows(thumbs: np.ndarray, centring, rows: np.ndarray, variant: int) -> np.ndarray:
    """(len(rows), s·s) centred unit rows of one query variant of ``thumbs[rows]``: variant = zoom·8 + flip·4 +
    rotation (quarter turns), the 8 flips/rotations of a square (the dihedral group D4) at each zoom."""
    z, rest = divmod(variant, 8)
    flip, rot = divmod(rest, 4)
    means, norms = centring
    t = thumbs[rows, z].astype(np.float32) - means[rows, z, None, None]
    t = np.rot90(t[:, :, ::-1] if flip else t, rot, axes=(1, 2))
    return np.ascontiguousarray(t).reshape(len(rows), -1) / norms[rows, z, None]


def route_rows(rows: np.ndarray, pool: int, invariant: bool = False) -> np.ndarray:
    """(n, s·s) unit rows of square thumbnails -> (n, (s/pool)²) unit rows that route them to lists: their
    pool×pool block means (flips and quarter turns commute with it, so a variant's pooled row is the pooled
    variant); ``invariant``: summed over the 8 flips/rotations, so that every flip/rotation of an image has the
    same route row (``dedup.routing``)."""
    n, cells = rows.shape
    side = int(round(cells ** 0.5))
    g = rows.reshape(n, side, side)
    if pool > 1:  # pool² strided adds: numpy's mean over two non-adjacent axes is ~20x slower
        g = sum(g[:, i::pool, j::pool] for i in range(pool) for j in range(pool))
    if invariant:
        g = g + g[:, ::-1, ::-1]  # + half turn
        g = g + np.rot90(g, 1, axes=(1, 2))  # + quarter turns: all 4 rotations
        g = g + g[:, :, ::-1]  # + their mirror images: the 8 of D4
    p = g.reshape(n, -1)
    return np.ascontiguousarray(p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12), np.float32)


def dihedral_perms(side: int) -> np.ndarray:
    """(8, side²) index maps of the 8 flips/rotations of a flattened side×side grid, in ``_variant_rows``' order
    (flip·4 + quarter turns): ``variant_row = row[perm[d]]``."""
    grid = np.arange(side * side).reshape(side, side)
    return np.stack([np.rot90(grid[:, ::-1] if flip else grid, rot).ravel() for flip in (0, 1) for rot in range(4)])


# The screening product runs on int8 rows: row x (centred, unit) is stored as q = round(x · s), s = 127 / max|x|,
# with its exact rounding error e = ||x - q / s||. For unit rows x, y: |x·y - (q_x·q_y) / (s_x s_y)| <= e_x + e_y
# + 3 e_x e_y (Cauchy-Schwarz on each error term; q_x·q_y is an exact int32 sum), so a pair above the threshold
# always passes the screen "estimate > threshold - that bound", and every pair that passes is measured again in
# fp32. On the synthetic thumbnails e is ~0.006 (median) to 0.02 (max): the screen sits near 0.96.
SCREEN_SLACK = 1e-5  # fp32 rounding of the estimate's two scalings


class Prints:
    """Fingerprint thumbnails made ready for the search: ``thumbs`` (n, Z, s, s) uint8 as stored, their centring
    (``_centring``: means, norms (n, Z)), their centred unit rows quantised to int8 for the screening product,
    ``rows8`` (n, Z, s·s), with each row's inverse scale ``inv8`` and exact quantisation error ``err8`` (n, Z);
    ``exact`` gives a variant's fp32 rows. Z KB per image besides the thumbnails."""

    def __init__(self, thumbs: np.ndarray, centring: tuple[np.ndarray, np.ndarray] | None = None,
                 block: int = 8192):
        self.thumbs = thumbs
        self.centring = centring if centring is not None else _centring(thumbs)
        n, z = thumbs.shape[:2]
        self.rows8 = np.empty((n, z, thumbs.shape[2] * thumbs.shape[3]), np.int8)
        self.inv8, self.err8 = np.empty((n, z), np.float32), np.empty((n, z), np.float32)
        for a in range(0, n, block):  # fp32 only a block at a time
            idx = np.arange(a, min(n, a + block))
            for zz in range(z):
                x = _variant_rows(thumbs, self.centring, idx, zz * 8)
                scale = 127.0 / np.maximum(np.abs(x).max(axis=1), 1e-12)
                q = np.rint(x * scale[:, None])
                self.rows8[idx, zz] = q
                self.inv8[idx, zz] = 1.0 / scale
                self.err8[idx, zz] = np.linalg.norm(x - q / scale[:, None], axis=1)

    def __len__(self) -> int:
        return len(self.thumbs)

    def exact(self, rows: np.ndarray, variant: int) -> np.ndarray:
        return _variant_rows(self.thumbs, self.centring, rows, variant)

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything, as arrays with one row per image (to store; ``of_arrays`` reads them back)."""
        return {"thumbs": self.thumbs, "means": self.centring[0], "norms": self.centring[1], "rows8": self.rows8,
                "inv8": self.inv8, "err8": self.err8}

    @classmethod
    def of_arrays(cls, arrays: dict[str, np.ndarray]) -> Prints:
        self = cls.__new__(cls)
        self.thumbs, self.centring = arrays["thumbs"], (arrays["means"], arrays["norms"])
        self.rows8, self.inv8, self.err8 = arrays["rows8"], arrays["inv8"], arrays["err8"]
        return self


def _top_per_group(group: np.ndarray, s: np.ndarray, tie: np.ndarray, kk: int) -> np.ndarray:
    """Positions of the entries among the ``kk`` largest ``s`` of their group (ties: the smaller ``tie``)."""
    o = np.lexsort((tie, -s, group))
    g = group[o]
    return o[np.arange(len(o)) - np.searchsorted(g, g) < kk]


def _best_per_pair(a: np.ndarray, b: np.ndarray, s: np.ndarray):
    """Each (a, b) once with its largest ``s``, sorted by (a, b)."""
    key = a * (int(b.max(initial=0)) + 1) + b
    o = np.lexsort((-s, key))
    first = np.ones(len(o), bool)
    first[1:] = key[o][1:] != key[o][:-1]
    sel = o[first]
    return a[sel], b[sel], s[sel].astype(np.float32)


def _probe_lists(lists, prints: Prints, probe: int, pool: int = 1, invariant: bool = False,
                 block: int = 16384) -> np.ndarray:
    """(len(prints), Z·8, probe) ids of the ``probe`` lists nearest to each query variant of each image, lists
    of ``route_rows``. ``invariant``: one search per zoom, which its 8 flips/rotations share; else each zoom is
    searched against the 8 flips/rotations of the centroids (a variant's product with a centroid is its zoom's
    with the inversely permuted centroid)."""
    import faiss

    nz = prints.thumbs.shape[1]
    routers = []  # variant routing: the centroids flipped/rotated, one index per flip/rotation
    if not invariant:
        centroids = lists.reconstruct_n(0, lists.ntotal)
        for inv in np.argsort(dihedral_perms(int(round(centroids.shape[1] ** 0.5))), axis=1):
            r = faiss.IndexFlatIP(centroids.shape[1])
            r.add(np.ascontiguousarray(centroids[:, inv]))
            routers.append(r)
    out = np.empty((len(prints), nz * 8, probe), np.int64)
    for a in range(0, len(prints), block):
        rows = np.arange(a, min(len(prints), a + block))
        for z in range(nz):
            x = route_rows(prints.exact(rows, z * 8), pool, invariant)
            if invariant:
                out[rows, z * 8:z * 8 + 8] = lists.search(x, probe)[1][:, None]
            else:
                for d, r in enumerate(routers):
                    out[rows, z * 8 + d] = r.search(x, probe)[1]
    return out


def search_members(queries: Prints, probes: np.ndarray, base: Prints, base_ids: np.ndarray, base_list: np.ndarray,
                   k: int, threshold: float, same_ids: np.ndarray | None = None, chunk_cells: int = 1 << 23):
    """The core of the fingerprint search: each query variant against the index rows of the lists it probes.

    ``probes``: (nq, V, P) list ids per query image and variant (-1: none); ``base``: the index's zoom-1
    prints, sorted by ``base_list`` (their list ids), ``base_ids`` their ids. Per list, every query variant
    that probes it is gathered (``variant_rows8``) and multiplied with the list's rows in one int8 matrix product
    (exact int32 sums), in blocks of at most ``chunk_cells`` similarities; entries whose estimate is within the
    rows' quantisation bound of the threshold (``Prints``) are measured again in fp32 and only those above
    ``threshold`` leave a block, at most ``k`` per query variant. (One product per list and not per (list,
    variant): with 24 variants a shard's queries split into blocks of a few dozen rows at 10⁶ images, where the
    product runs at a tenth of its speed.) ``same_ids``: the queries' ids when they are index rows too (a row
    never pairs with itself). Returns (query row · V + variant, index id, cosine), not yet reduced over lists.
    (Screening pairs on 8×8 block means was slower on CPU: within a list 3–25% of pairs pass any useful screen,
    and gathering them costs more than the product.)"""
    import torch

    nq, nv, probe = probes.shape
    probe_list = probes.ravel().astype(np.int64)
    ok = np.flatnonzero(probe_list >= 0)
    by_list = ok[np.argsort(probe_list[ok], kind="stable")]  # entries (query, variant, probe) grouped by list
    sorted_lists = probe_list[by_list]
    lists, starts = np.unique(base_list, return_index=True)
    ends = np.append(starts[1:], len(base_list))
    out_q, out_m, out_s = [], [], []
    for c, a0, b0 in zip(lists.tolist(), starts.tolist(), ends.tolist()):
        lo, hi = np.searchsorted(sorted_lists, [c, c + 1])
        if lo == hi:
            continue
        entry = by_list[lo:hi] // probe  # query row · V + variant
        entry = entry[np.argsort(entry % nv % 8, kind="stable")]  # grouped by flip/rotation: one copy each
        members = torch.from_numpy(base.rows8[a0:b0, 0]).T
        inv_m = torch.from_numpy(base.inv8[a0:b0, 0])
        err_m = float(base.err8[a0:b0, 0].max())
        step = max(1, chunk_cells // (b0 - a0))
        for a in range(0, len(entry), step):
            qv = entry[a:a + step]
            rows, zoom = qv // nv, qv % nv // 8
            sims = torch._int_mm(torch.from_numpy(variant_rows8(queries, rows, qv % nv)), members).float()
            sims *= inv_m  # x·y ≈ q_x·q_y / (s_x s_y): the members' scales here, the queries' per row below
            inv_q, err_q = queries.inv8[rows, zoom], queries.err8[rows, zoom]
            screen = torch.from_numpy(threshold - err_q - err_m - 3 * err_q * err_m - SCREEN_SLACK) / \
                torch.from_numpy(inv_q)
            hit = torch.nonzero(sims.amax(1) > screen)[:, 0]  # few rows: nonzero over all cells costs more
            if not len(hit):
                continue
            ci, mi = (t.numpy() for t in torch.nonzero(sims[hit] > screen[hit, None], as_tuple=True))
            qvi, mi = qv[hit.numpy()[ci]], mi + a0
            si = np.einsum("ij,ij->i", exact_rows(queries, qvi // nv, qvi % nv), base.exact(mi, 0))
            above = si > threshold
            qvi, mi, si = qvi[above], base_ids[mi[above]], si[above]
            if same_ids is not None:
                other = same_ids[qvi // nv] != mi
                qvi, mi, si = qvi[other], mi[other], si[other]
            if len(qvi) > k:  # a block holds each query variant once: keep its k best here already
                top = _top_per_group(qvi, si, mi, k)
                qvi, mi, si = qvi[top], mi[top], si[top]
            out_q.append(qvi)
            out_m.append(mi)
            out_s.append(si.astype(np.float32))
    if not out_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(out_q), np.concatenate(out_m), np.concatenate(out_s)


def variant_rows8(prints: Prints, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """(len(rows), s·s) int8 rows of variant ``variants[i]`` of image ``rows[i]``: a row gather of the zooms'
    rows, then each flip/rotation as one strided copy over the rows that need it (fastest when the rows come
    grouped by ``variants % 8``). A variant shares its zoom's scale and quantisation error."""
    nz, cells = prints.rows8.shape[1:]
    side = prints.thumbs.shape[2]
    out = np.take(prints.rows8.reshape(-1, cells), rows * nz + variants // 8, axis=0)
    d = variants % 8
    cut = np.flatnonzero(np.diff(d)) + 1
    for a, b in zip(np.r_[0, cut].tolist(), np.r_[cut, len(d)].tolist()):
        flip, rot = divmod(int(d[a]), 4)
        if flip or rot:
            g = out[a:b].reshape(-1, side, side)
            out[a:b] = np.rot90(g[:, :, ::-1] if flip else g, rot, axes=(1, 2)).reshape(b - a, cells)
    return out


def exact_rows(prints: Prints, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """fp32 rows of variant ``variants[i]`` of image ``rows[i]`` (``_variant_rows``, mixed variants)."""
    out = np.empty((len(rows), prints.thumbs.shape[2] * prints.thumbs.shape[3]), np.float32)
    for v in np.unique(variants).tolist():
        sel = np.flatnonzero(variants == v)
        out[sel] = prints.exact(rows[sel], v)
    return out


def list_count(m: int, cfg: DedupConfig) -> int:
    """How many lists the partitioned search splits ``m`` index rows into (1 up to ``cfg.flat_max``: exact)."""
    if cfg.routing not in ROUTINGS:
        raise ValueError(f"curation dedup.routing={cfg.routing!r}: choose one of {list(ROUTINGS)}")
    if m <= cfg.flat_max:
        return 1
    routed = max(1, cfg.list_probe) * (8 if cfg.invariant_routing else 1)  # variants per routing search
    size = cfg.list_size or max(250, round((m / routed) ** 0.5 / max(1, cfg.route_pool)))
    return max(1, m // size)


def _dihedral_search(query_thumbs: np.ndarray, index_thumbs: np.ndarray, k: int, threshold: float,
                     cfg: DedupConfig, same: bool, chunk_cells: int = 1 << 23):
    """(query row, index row, best cosine over all zooms × flips × rotations of the query) above ``threshold``,
    among the ``k`` most similar index rows of each query variant (``same``: one set, no row pairs with itself).

    The index holds each index image's zoom-1 thumbnail. Up to ``cfg.flat_max`` index rows the search is exact:
    every query variant against every index row. Above it the index rows are split into faiss k-means lists
    of ~``cfg.list_size`` rows (trained on ``coarse_sample``) and each query variant is compared with the rows
    of its ``cfg.list_probe`` nearest lists, so cost is ~N · 8Z · list_probe · list_size instead of N · 8Z · M
    (``search_members``). ``curation.dedup_stage`` runs the same search over shards.
    """
    nq, nv, m = len(query_thumbs), query_thumbs.shape[1] * 8, len(index_thumbs)
    queries = Prints(query_thumbs)
    icentre = queries.centring if same else _centring(index_thumbs)
    pool, nlist = cfg.route_pool, list_count(m, cfg)
    if nlist == 1:
        home = np.zeros(m, np.int64)
        probes = np.zeros((nq, nv, 1), np.int64)
    else:
        base = _variant_rows(index_thumbs, icentre, np.arange(m), 0)  # (M, s·s) fp32, for the lists only
        invariant = cfg.invariant_routing
        lists = _kmeans_lists(route_rows(base[coarse_sample(m, nlist)], pool, invariant), nlist)
        home = lists.search(route_rows(base, pool, invariant), 1)[1][:, 0]
        del base
        probes = _probe_lists(lists, queries, min(cfg.list_probe, nlist), pool, invariant)
    order = np.argsort(home, kind="stable")
    index = Prints(index_thumbs[order, :1], (icentre[0][order, :1], icentre[1][order, :1]))
    qv, mi, si = search_members(queries, probes, index, order, home[order], k, threshold,
                                same_ids=np.arange(nq) if same else None, chunk_cells=chunk_cells)
    if len(qv) == 0:
        return qv, mi, si
    top = _top_per_group(qv, si, mi, k)  # the k best per query variant over all its lists
    return _best_per_pair(qv[top] // nv, mi[top], si[top])


def dihedral_knn_edges(thumbs: np.ndarray, k: int, threshold: float, cfg: DedupConfig):
    """Near-duplicate edges from fingerprint thumbnails (N, Z, s, s), uint8 as stored or float
    (``features.fingerprint``); each is compared with its mean removed.

    The index holds each image's zoom-1 thumbnail; every image is queried with all zoom levels × the 8
    flips/rotations of its thumbnail, so flipped, rotated and slightly cropped copies are found exactly
    (query expansion instead of an invariant, lossy descriptor); exact up to ``cfg.flat_max`` images,
    partitioned above (``_dihedral_search``). Returns (i, j, cosine), i < j, with the best cosine per pair
    above ``threshold``.
    """
    q, m, s = _dihedral_search(thumbs, thumbs, k, threshold, cfg, same=True)
    return _best_per_pair(np.minimum(q, m), np.maximum(q, m), s)


def cross_edges(train_thumbs: np.ndarray, eval_thumbs: np.ndarray, k: int, threshold: float, cfg: DedupConfig):
    """Leakage guard edges: (train row, eval row, best cosine) above ``threshold``, searched both ways
    (training images against the evaluation index and evaluation images against the training index), so
    a copy is found whichever of the two was cropped or zoomed."""
    t, e, s = _dihedral_search(train_thumbs, eval_thumbs, k, threshold, cfg, same=False)
    e2, t2, s2 = _dihedral_search(eval_thumbs, train_thumbs, k, threshold, cfg, same=False)
    return _best_per_pair(np.concatenate([t, t2]), np.concatenate([e, e2]), np.concatenate([s, s2]))


def select_representatives(rank: np.ndarray, i: np.ndarray, j: np.ndarray, s: np.ndarray):
    """Greedy near-duplicate removal over similarity edges (i, j, cosine), all above the threshold.

    Rows are visited by ``rank`` (lower first); a row with an edge to an already kept row is removed as a
    duplicate of the most similar kept one, any other row is kept. Returns (keep mask, duplicate_of row or -1,
    similarity to it). No chaining: a removed row's similarity to its representative is an edge above the
    threshold."""
    n = len(rank)
    a, b, w = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([s, s]).astype(np.float32)
    o = np.argsort(a, kind="stable")
    a, b, w = a[o], b[o], w[o]
    starts = np.searchsorted(a, np.arange(n + 1))
    keep = np.ones(n, bool)
    dup_of = np.full(n, -1, np.int64)
    sim = np.zeros(n, np.float32)
    with_edges = np.flatnonzero(starts[1:] > starts[:-1])
    for m in with_edges[np.argsort(rank[with_edges], kind="stable")]:
        nb, ws = b[starts[m]:starts[m + 1]], w[starts[m]:starts[m + 1]]
        ok = keep[nb] & (rank[nb] < rank[m])  # visited before m and kept
        if ok.any():
            t = int(np.argmax(np.where(ok, ws, -np.inf)))
            keep[m], dup_of[m], sim[m] = False, nb[t], ws[t]
    return keep, dup_of, sim


def keep_order(labelled, width, height, dataset, image_id, priority: list[str]) -> np.ndarray:
    """Rank of each row under the keep policy (lower = keep first)."""
    rank = {d: r for r, d in enumerate(priority)}
    keys = [(not lab, -(w * h), rank.get(ds, len(priority)), iid)
            for lab, w, h, ds, iid in zip(labelled, width, height, dataset, image_id)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    out = np.empty(len(keys), dtype=np.int64)
    out[order] = np.arange(len(keys))
    return out


def resolve(rank: np.ndarray, rep: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray):
    """The keep decisions (module docstring) from the keep-policy ``rank`` of each row, its exact-copy
    representative ``rep`` (itself unless an identical image ranks first) and near-duplicate edges (a, b, cosine).
    Returns (keep mask, duplicate_of row or -1, similarity, removed as an exact copy). Only the rows that
    appear in ``rep``'s groups or in an edge matter, so callers may pass just those (``dedup_stage``)."""
    n = len(rank)
    keep = rep == np.arange(n)
    dup_of, sim = np.where(keep, -1, rep), np.where(keep, 0.0, 1.0).astype(np.float32)
    if len(a):
        a, b = rep[a], rep[b]  # an exact copy's neighbours are its representative's (same pixels)
        own = a != b
        near_keep, near_of, near_sim = select_representatives(rank, a[own], b[own], s[own])
        removed = keep & ~near_keep
        dup_of[removed], sim[removed] = near_of[removed], near_sim[removed]
        keep &= near_keep
        # exact copies of a near-duplicate point at the image kept in its place, with the same similarity
        moved = ~keep & (dup_of >= 0) & ~keep[np.maximum(dup_of, 0)]
        sim[moved] = sim[dup_of[moved]]
        dup_of[moved] = dup_of[dup_of[moved]]
    exact = (~keep) & (rep != np.arange(n)) & (dup_of == rep)
    return keep, dup_of, sim, exact


def deduplicate(manifest, embeddings: np.ndarray | None, cfg: DedupConfig,
                thumbs: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """manifest: pandas DataFrame (image_id, pixel_sha256, cell_type, width, height, dataset), rows aligned
    with ``embeddings`` (L2-normalised) and/or fingerprint ``thumbs``. Near-duplicates come from the
    fingerprints when given (recommended), else from the embeddings. Returns (keep mask, duplicate rows); see
    the module docstring for the rules."""
    n = len(manifest)
    rank = keep_order(manifest["cell_type"].notna().tolist(),
                      manifest["width"].tolist(), manifest["height"].tolist(), manifest["dataset"].tolist(),
                      manifest["image_id"].tolist(), cfg.dataset_priority)
    ids = manifest["image_id"].tolist()
    rep = np.arange(n)  # each row's exact-copy representative (itself unless an identical image ranks first)
    if cfg.exact:
        for idx in manifest.groupby("pixel_sha256").indices.values():
            if len(idx) > 1:
                rep[idx] = idx[np.argmin(rank[idx])]
    a = b = np.zeros(0, np.int64)
    s = np.zeros(0, np.float32)
    if cfg.near and (rep == np.arange(n)).sum() > 1 and (thumbs is not None or embeddings is not None):
        if thumbs is not None:
            a, b, s = dihedral_knn_edges(thumbs, cfg.k, cfg.threshold, cfg)
        else:
            a, b, s = knn_edges(embeddings, cfg.k, cfg.threshold, cfg)
    keep, dup_of, sim, exact = resolve(rank, rep, a, b, s)
    dups = [{"image_id": ids[m], "duplicate_of": ids[int(dup_of[m])], "similarity": float(sim[m]),
             "reason": "exact" if exact[m] else "near_duplicate"} for m in np.flatnonzero(~keep)]
    log.info("dedup: %d images, %d duplicates (%d exact)", n, len(dups), int(exact.sum()))
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


def remove_leakage_and_duplicates(frame, embeddings: np.ndarray, thumbs: np.ndarray | None,
                                  eval_sets: list[tuple[str, list[str], np.ndarray]], cfg: DedupConfig):
    """The dedup stage's decisions (module docstring): leakage over every row first, then exact and near
    duplicates among the rest. ``eval_sets``: (name, image ids, fingerprints) per evaluation manifest. Returns
    (keep mask, duplicate rows with dataset and duplicate_of_dataset)."""
    n = len(frame)
    ids, datasets = frame["image_id"].tolist(), frame["dataset"].tolist()
    leaked = np.zeros(n, bool)
    dups: list[dict] = []
    if eval_sets and thumbs is not None:
        hits = leakage_guard(thumbs, eval_sets, cfg)
        for r in sorted(hits):
            eval_id, name, v = hits[r]
            leaked[r] = True
            dups.append({"image_id": ids[r], "duplicate_of": eval_id, "similarity": float(v), "reason": "leakage",
                         "dataset": datasets[r], "duplicate_of_dataset": name})
        log.info("leakage guard: %d training images dropped as near-copies of %d evaluation images",
                 len(hits), sum(len(e[1]) for e in eval_sets))
    rest = np.flatnonzero(~leaked)
    keep_rest, rest_dups = deduplicate(frame.iloc[rest].reset_index(drop=True), embeddings[rest], cfg,
                                       thumbs=None if thumbs is None else thumbs[rest])
    dataset_of = dict(zip(ids, datasets))
    for d in rest_dups:
        d["dataset"], d["duplicate_of_dataset"] = dataset_of[d["image_id"]], dataset_of[d["duplicate_of"]]
    keep = np.zeros(n, bool)
    keep[rest[keep_rest]] = True
    return keep, dups + rest_dups
