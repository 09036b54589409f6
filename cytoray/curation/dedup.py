"""Deduplication as copy detection: the leakage guard first, then exact copies (identical decoded pixels) and near
duplicates (the same picture re-exported), within and across datasets.

Two images are the same picture when one maps onto the other by what re-exports do (re-encoding, another box,
rescaling, flips and quarter turns, colour and stain shifts) — not when they merely look alike: distinct cells of
one class and source are close by nature, and among 10⁸ cells many pairs pass any fixed similarity. So near
duplicates and leakage are decided in two named steps (docs/curation.md, "Duplicates"):

1. **Candidates** (``candidate_pairs``): each image's two views (``features.fingerprint``: one anchored on its content, one of its frame) are
   searched against the same view of every other image under the 8 flips/rotations; each image keeps its
   ``candidates`` most similar partners per view above ``candidate_threshold`` (view cosine). Tuned for recall:
   the source of a planted copy is the nearest image of one view for 99.6% of copies among 29,914 images.
2. **Verification** (``verification.verify_pairs``): per candidate pair, the transform that maps one verification
   thumbnail onto the other (flip/rotation, scale per axis, shift) and the aligned pixels' score (1 - the largest
   local mismatch). Only a pair whose score reaches ``threshold`` (``leakage_threshold`` against evaluation
   images) is a duplicate; its record says which transform. A pair that cannot be compared (too little overlap or
   structure) is unverifiable: both images stay, and the stage counts it.

The decisions on verified pairs:

1. **Leakage guard** (with ``eval_manifests``, held-out labelled sets): their images are fingerprinted the same
   way and *every* ingested image with a verified copy among them is dropped with ``reason = "leakage"``,
   ``duplicate_of`` = that evaluation image, ``duplicate_of_dataset`` = ``eval:<manifest uri>``. It runs before
   in-collection dedup, so leakage takes precedence: four copies of one evaluation cell are four leakage rows.
2. **Exact duplicates**: per pixel hash, the first image by the keep policy stays; the others are ``exact``.
3. **Near duplicates, without chaining** (the SemDeDup / NeMo rule): images are visited in keep-policy order and
   one is removed only when it has a verified edge to an image *already kept*; it is recorded as a duplicate of
   the best-scoring such image. So A~B and B~C never removes C for A's sake.

Keep policy, first wins:
1. labelled (``cell_type`` not null) before unlabelled;
2. more pixels (width × height) before fewer (re-exports are usually downscaled);
3. position of its dataset in ``dataset_priority`` (unlisted datasets after listed ones);
4. ``image_id`` (deterministic tie-break).
Every removed image goes to ``duplicates.parquet`` (image_id, duplicate_of, similarity = the verified score,
reason, transform) and ``duplicate_of`` always names an image that is kept (or an evaluation image, for leakage).

The candidate search is exact up to ``flat_max`` index rows and partitioned above it: faiss k-means lists, each
query compared with the rows of its few nearest lists by one dense matrix product per list (int8, whose estimates
are within an exact quantisation bound of the fp32 cosine, ``search_members``: they propose candidates, verification
decides), so cost grows as
N · probe · list size instead of N². ``curation.dedup_stage`` runs the same steps over shards as Ray tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from cytoray.config import location_field
from cytoray.curation.verification import dihedral_perms

log = logging.getLogger(__name__)

ROUTINGS = ("variant", "closed", "invariant")  # DedupConfig.routing


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    # Verified score (``verification``: 1 - the largest local mismatch of the aligned pictures) from which a
    # candidate pair is a near duplicate. Planted copies of 96 px cells score 0.78-1.0 (99.8% of them >= 0.8),
    # distinct look-alike cells (same class, stain, size and position) at most 0.25; the candidate pairs of distinct
    # cells that score 0.75-0.8 are featureless blobs (platelets, smooth round cells) on empty background
    # (benchmarks/RESULTS.md, "Copy detection").
    threshold: float = 0.8
    # Leakage guard: training images with a verified copy (score >= leakage_threshold) among the images of these
    # evaluation manifests (Parquet with a ``uri`` column; ``image_id`` optional) are dropped. The same cut as
    # ``threshold``: planted copies of evaluation images score >= 0.93, while distinct featureless blobs reach
    # 0.75-0.78, and a false flag is reported as contamination (benchmarks/RESULTS.md, "Copy detection").
    eval_manifests: list[str] = location_field(default_factory=list)
    leakage_threshold: float = 0.8
    # Candidate search: per image and view, the ``candidates`` most similar images whose view cosine (best of the
    # 8 flips/rotations) exceeds ``candidate_threshold`` go to verification. 0.6: a copy cut into its nucleus can
    # fall to 0.6-0.75 and still be the nearest image; 0.75 lost 0.1% of planted copies for 0.26 fewer pairs per
    # image (benchmarks/RESULTS.md, "Candidate views").
    candidates: int = 1
    candidate_threshold: float = 0.6
    dataset_priority: list[str] = field(default_factory=list)
    flat_max: int = 5_000  # exact search up to this many index rows, partitioned above
    # Partitioned search: k-means lists of ~list_size images per view, each query variant searching its
    # list_probe nearest lists. Cost per image and view ~ 8 routing searches over N / list_size centroids (1 with
    # routing=invariant) + 8 · list_probe · list_size rows. 0: the size that balances the two,
    # sqrt(N / list_probe) / route_pool (variant) or sqrt(N / (8 · list_probe)) / route_pool (invariant), at least 250.
    list_size: int = 0
    list_probe: int = 3
    # How a query variant finds its lists. "variant": each of the 8 flips/rotations on its own route row (exact).
    # "invariant": one search on a row summed over the 8 (``route_rows``), shared by them: routing costs an eighth,
    # but the coarser rows put copies in other lists more often (benchmarks/RESULTS.md). "closed": each variant on
    # its own route row, the lists trained closed under the 8 flips/rotations (from CLOSED_MIN_LISTS lists), so
    # that one search serves the 8: routing costs an eighth; at 10^6 images 0.09% of copies fewer (near-symmetric
    # centroids give near-tied lists; benchmarks/RESULTS.md "Closed lists").
    routing: str = "variant"
    # Lists are trained and routed on route_pool×route_pool block means of the views (16×16 for 32×32: a quarter
    # of routing's work); 1: full views.
    route_pool: int = 2
    # Sharded search (curation.dedup_stage, a join): index images per partition of lists, per view (about: up to
    # ~1.5x, from the lists' estimated sizes). One compare task holds one partition (1,040 bytes per image: a
    # view's int8 row, its scale, row id and list; ~2x that while it sorts them by list) plus one query file.
    partition_rows: int = 262_144
    # Verification pass (sharded): candidate pairs per verification task (its images' fingerprints, ~11 KB each,
    # about 1.4 images per pair, are what it holds: ~0.5 GB at 32,768 pairs, before decoding copies).
    verify_pairs: int = 32_768

    @property
    def invariant_routing(self) -> bool:
        return self.routing == "invariant"


def check_config(cfg: DedupConfig) -> None:
    """Bad settings fail with the key named."""
    if cfg.routing not in ROUTINGS:
        raise ValueError(f"curation dedup.routing={cfg.routing!r}: choose one of {list(ROUTINGS)}")
    if cfg.candidates < 1:
        raise ValueError(f"curation dedup.candidates={cfg.candidates} must be >= 1 (candidates per image and view)")
    for key in ("threshold", "leakage_threshold"):
        if not -1.0 <= getattr(cfg, key) <= 1.0:
            raise ValueError(f"curation dedup.{key}={getattr(cfg, key)} is a verified score in [-1, 1] (1 - local "
                             "mismatch; docs/curation.md)")
    if not -1.0 < cfg.candidate_threshold < 1.0:
        raise ValueError(f"curation dedup.candidate_threshold={cfg.candidate_threshold} is a cosine in (-1, 1)")


class Pairs(NamedTuple):
    """Candidate pairs and what verification made of them: rows a < b (or query/evaluation rows), the candidate
    view cosine and view, the verified score (NaN: unverifiable) and transform (d, sx, sy, tx, ty of b onto a)."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    view: np.ndarray
    score: np.ndarray
    transform: np.ndarray

    @classmethod
    def empty(cls) -> Pairs:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int8),
                   np.zeros(0, np.float32), np.zeros((0, 5), np.float32))

    def take(self, sel) -> Pairs:
        return Pairs(*(x[sel] for x in self))

    @classmethod
    def concat(cls, parts: list[Pairs]) -> Pairs:
        parts = [p for p in parts if len(p.a)]
        return cls(*(np.concatenate(x) for x in zip(*parts))) if parts else cls.empty()

    def verified(self, threshold: float) -> np.ndarray:
        return np.nan_to_num(self.score, nan=-np.inf) >= threshold


def coarse_sample(m: int, nlist: int, cap: int = 131_072, seed: int = 1234) -> np.ndarray:
    """Sorted positions of the rows a coarse k-means over ``m`` rows trains on: 64 per list, at most ``cap``.
    Drawn here, not inside faiss, so that every process that holds some of the rows trains on the same ones."""
    size = int(min(m, nlist * 64, cap))
    return np.sort(np.random.default_rng(seed).choice(m, size, replace=False))


# routing=closed with at least this many lists trains them closed under the flips/rotations (``_kmeans_lists``):
# one routing search instead of 8. Below it routing costs little, and a few base centroids made closed fit the
# collection worse (640 images in 16 closed lists: 92% of the exact search's pairs, against 95% for 12 lists).
CLOSED_MIN_LISTS = 128


def closed_routing(cfg: DedupConfig, nlist: int) -> bool:
    """Whether the search's lists are trained closed under the 8 flips/rotations (``CLOSED_MIN_LISTS``)."""
    return cfg.routing == "closed" and nlist >= CLOSED_MIN_LISTS


def _kmeans_lists(sample: np.ndarray, nlist: int, closed: bool = False, niter: int = 10, seed: int = 1234):
    """An inner-product index over the centroids of a spherical k-means of ``sample`` (all of it: the caller draws
    the sample, ``coarse_sample``). Flat: on CPU a BLAS product with every centroid is faster than an HNSW graph
    over them up to 20,000 lists at least, and exact (benchmarks/RESULTS.md).

    ``closed`` (``dedup.routing=closed``): the lists are closed under the 8 flips/rotations — ceil(nlist / 8) base
    centroids and their 8 variants, list ``d · base + j`` being variant d of base centroid j — so that one routing
    search serves an image's 8 variants (``Router``). Trained as a k-means whose centroids are tied that way:
    each sample joins its nearest list (j, d) and is turned back by d⁻¹ into base j's pose before the means."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if not closed:
        km = faiss.Kmeans(sample.shape[1], nlist, niter=niter, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=len(sample) // max(1, nlist) + 1, min_points_per_centroid=1)
        km.train(sample)
        index = faiss.IndexFlatIP(sample.shape[1])
        index.add(km.centroids)
        return index
    import scipy.sparse as sp

    m, dim = sample.shape
    perms = dihedral_perms(int(round(dim ** 0.5)))
    inverse = np.argsort(perms, axis=1)
    nbase = max(1, -(-nlist // 8))
    rng = np.random.default_rng(seed)
    base = sample[rng.choice(m, nbase, replace=m < nbase)]
    for _ in range(niter):
        index = faiss.IndexFlatIP(dim)
        index.add(np.concatenate([base[:, perm] for perm in perms]))
        lab = index.search(sample, 1)[1][:, 0]
        d, j = lab // nbase, lab % nbase
        posed = np.empty_like(sample)
        for dd in range(8):  # each sample in its base centroid's pose: variant d of c is c[perm_d], so c ~ x[inv_d]
            sel = np.flatnonzero(d == dd)
            posed[sel] = sample[sel][:, inverse[dd]]
        sums = sp.csr_matrix((np.ones(m, np.float32), (j, np.arange(m))), shape=(nbase, m)) @ posed
        empty = np.flatnonzero(np.bincount(j, minlength=nbase) == 0)
        sums[empty] = sample[rng.choice(m, len(empty), replace=m < len(empty))]  # an empty list: a new seed
        base = (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(np.concatenate([base[:, perm] for perm in perms])))
    return index


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


# The candidate product runs on int8 rows: row x (centred, unit) is stored as q = round(x · s), s = 127 / max|x|,
# with its exact rounding error e = ||x - q / s||. For unit rows x, y: |x·y - (q_x·q_y) / (s_x s_y)| <= e_x + e_y
# + 3 e_x e_y (Cauchy-Schwarz on each error term; q_x·q_y is an exact int32 sum). On the band-passed views e is
# ~0.01: the estimate proposes candidates; verification measures the pixels.


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
        return len(self.rows8)

    def exact(self, rows: np.ndarray, variant: int) -> np.ndarray:
        return _variant_rows(self.thumbs, self.centring, rows, variant)

    def arrays(self, compact: bool = False) -> dict[str, np.ndarray]:
        """Arrays with one row per image (to store; ``of_arrays`` reads them back). ``compact``: only what the
        screening product needs (``search_members``: the int8 rows and their scales, 1,028 bytes per image and
        view instead of 2,064): what the join search moves."""
        if compact:
            return {"rows8": self.rows8, "inv8": self.inv8}
        return {"thumbs": self.thumbs, "means": self.centring[0], "norms": self.centring[1], "rows8": self.rows8,
                "inv8": self.inv8, "err8": self.err8}

    @classmethod
    def of_arrays(cls, arrays: dict[str, np.ndarray]) -> Prints:
        """Prints from ``arrays()``; from compact arrays only the screening product works (no ``exact`` rows)."""
        self = cls.__new__(cls)
        self.thumbs = arrays.get("thumbs")
        self.centring = (arrays["means"], arrays["norms"]) if "means" in arrays else None
        self.rows8, self.inv8, self.err8 = arrays["rows8"], arrays["inv8"], arrays.get("err8")
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


class Router:
    """Which lists each flip/rotation of an image probes (``probe``: (n, 8, probe) for route rows of variant 0).
    Three ways: invariant routing (one search with the flip/rotation-summed rows, its result shared by the 8);
    closed lists (``_kmeans_lists(closed=True)``: one search — variant e's similarity to list (j, d) is variant
    0's to list (j, d'), so its probes are variant 0's renamed by the table ``_compose``); other lists (one flat
    index per flip/rotation over the inversely permuted centroids: a variant's product with a centroid is the
    image's with the inversely permuted centroid)."""

    def __init__(self, lists, invariant: bool):
        import faiss

        self.lists, self.kind, self.nbase = lists, "invariant" if invariant else "variant", 0
        if invariant:
            return
        centroids = lists.reconstruct_n(0, lists.ntotal)
        perms = dihedral_perms(int(round(centroids.shape[1] ** 0.5)))
        if closed_lists(centroids):
            self.kind, self.nbase, self.compose = "closed", lists.ntotal // 8, _compose(perms)
            return
        self.routers = []
        for inv in np.argsort(perms, axis=1):
            r = faiss.IndexFlatIP(centroids.shape[1])
            r.add(np.ascontiguousarray(centroids[:, inv]))
            self.routers.append(r)

    def probe(self, x: np.ndarray, probe: int) -> np.ndarray:
        """(len(x), 8, probe) lists probed by the 8 flips/rotations of route rows ``x`` (``route_rows`` of
        variant 0)."""
        if self.kind == "invariant":
            return np.repeat(self.lists.search(x, probe)[1][:, None], 8, axis=1)
        if self.kind == "variant":
            return np.stack([r.search(x, probe)[1] for r in self.routers], axis=1)
        ids = self.lists.search(x, probe)[1]
        d, j = ids // self.nbase, ids % self.nbase
        return self.compose[:, d].transpose(1, 0, 2) * self.nbase + j[:, None]


def closed_lists(centroids: np.ndarray) -> bool:
    """Whether (8·B, s·s) centroids are B base centroids and their 8 flips/rotations, as ``_kmeans_lists(closed=
    True)`` lays them out (exactly: they are copies of the same floats)."""
    n, dim = centroids.shape
    if n % 8 or n == 0:
        return False
    blocks = centroids.reshape(8, n // 8, dim)
    perms = dihedral_perms(int(round(dim ** 0.5)))
    return all(np.array_equal(blocks[d], blocks[0][:, perms[d]]) for d in range(8))


def _compose(perms: np.ndarray) -> np.ndarray:
    """(8, 8) table t: variant e of an image scores against variant t[e, d] of a centroid as the image does
    against variant d (``perms``: ``dihedral_perms``; variant d of a row r is r[perms[d]]).
    Σ_i x[p_e[i]] c[p_t[i]] = Σ_k x[k] c[p_t[p_e⁻¹[k]]], which is Σ_k x[k] c[p_d[k]] where p_t = p_d ∘ p_e."""
    table = np.empty((8, 8), np.int64)
    for e in range(8):
        for d in range(8):
            target = perms[d][perms[e]]
            table[e, d] = next(k for k in range(8) if np.array_equal(perms[k], target))
    return table


def best_pairs(qv: np.ndarray, m: np.ndarray, s: np.ndarray, k: int, nv: int = 8):
    """From search results (query row · nv + variant, index row, estimate), possibly from several lists or
    partitions: the ``k`` best per query variant, then each (query row, index row) once with its best variant,
    sorted by pair (``_dihedral_search``; the sharded stage reduces its partitions' results with it)."""
    top = _top_per_group(qv, s, m, k)
    return _best_per_pair(qv[top] // nv, m[top], s[top])


def best_candidates(qv: np.ndarray, m: np.ndarray, s: np.ndarray, k: int, nv: int = 8):
    """``best_pairs``, then each query image's ``k`` best pairs (what ``_directed_candidates`` keeps per view)."""
    q, m, s = best_pairs(qv, m, s, k, nv)
    best = _top_per_group(q, s, m, k)
    return q[best], m[best], s[best]


def _probe_lists(lists, prints: Prints, probe: int, pool: int = 1, invariant: bool = False,
                 block: int = 16384) -> np.ndarray:
    """(len(prints), Z·8, probe) ids of the ``probe`` lists nearest to each query variant of each image, lists
    of ``route_rows``. ``invariant``: one search per zoom, which its 8 flips/rotations share; else each zoom is
    searched against the 8 flips/rotations of the centroids (``Router``)."""
    nz = prints.rows8.shape[1]
    router = Router(lists, invariant)
    out = np.empty((len(prints), nz * 8, probe), np.int64)
    for a in range(0, len(prints), block):
        rows = np.arange(a, min(len(prints), a + block))
        for z in range(nz):
            out[rows, z * 8:z * 8 + 8] = router.probe(route_rows(prints.exact(rows, z * 8), pool, invariant), probe)
    return out


def search_members(queries: Prints, probes: np.ndarray, base: Prints, base_ids: np.ndarray, base_list: np.ndarray,
                   k: int, threshold: float, same_ids: np.ndarray | None = None, chunk_cells: int = 1 << 23):
    """The core of the candidate search: each query variant against the index rows of the lists it probes.

    ``probes``: (nq, V, P) list ids per query image and variant (-1: none); ``base``: the index's prints, sorted by
    ``base_list`` (their list ids), ``base_ids`` their ids. Per list, every query variant that probes it is gathered
    (``variant_rows8``) and multiplied with the list's rows in one int8 matrix product (exact int32 sums), in blocks
    of at most ``chunk_cells`` similarities; each query variant's ``k`` best estimates above ``threshold`` leave a
    block. The estimates are within the rows' exact quantisation bound of the fp32 cosine (``Prints``: ~0.02 on the
    band-passed views), which is precision enough to propose candidates — verification decides. (One product per
    list and not per (list, variant): with many variants a shard's queries would split into blocks of a few dozen
    rows, where the product runs at a tenth of its speed.) ``same_ids``: the queries' ids when they are index rows
    too (a row never pairs with itself). Returns (query row · V + variant, index id, estimate), not yet reduced
    over lists."""
    import torch

    nq, nv, probe = probes.shape
    same = int(same_ids is not None)
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
        step = max(1, chunk_cells // (b0 - a0))
        kk = min(k + same, b0 - a0)  # + the query itself, dropped below
        for a in range(0, len(entry), step):
            qv = entry[a:a + step]
            rows, zoom = qv // nv, qv % nv // 8
            sims = torch._int_mm(torch.from_numpy(variant_rows8(queries, rows, qv % nv)), members).float()
            sims *= inv_m  # x·y ≈ q_x·q_y / (s_x s_y): the members' scales here, the queries' per row below
            sims *= torch.from_numpy(queries.inv8[rows, zoom])[:, None]
            vals, best = torch.topk(sims, kk, dim=1)
            ci, cj = (t.numpy() for t in torch.nonzero(vals > threshold, as_tuple=True))
            if not len(ci):
                continue
            qvi, mi, si = qv[ci], base_ids[best.numpy()[ci, cj] + a0], vals.numpy()[ci, cj]
            if same_ids is not None:
                other = same_ids[qvi // nv] != mi
                qvi, mi, si = qvi[other], mi[other], si[other]
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
    side = int(round(cells ** 0.5))
    out = np.take(prints.rows8.reshape(-1, cells), rows * nz + variants // 8, axis=0)
    d = variants % 8
    cut = np.flatnonzero(np.diff(d)) + 1
    for a, b in zip(np.r_[0, cut].tolist(), np.r_[cut, len(d)].tolist()):
        flip, rot = divmod(int(d[a]), 4)
        if flip or rot:
            g = out[a:b].reshape(-1, side, side)
            out[a:b] = np.rot90(g[:, :, ::-1] if flip else g, rot, axes=(1, 2)).reshape(b - a, cells)
    return out


def list_count(m: int, cfg: DedupConfig) -> int:
    """How many lists the partitioned search splits ``m`` index rows into (1 up to ``cfg.flat_max``: exact)."""
    check_config(cfg)
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
        lists = _kmeans_lists(route_rows(base[coarse_sample(m, nlist)], pool, invariant), nlist,
                              closed=closed_routing(cfg, nlist))
        probes = _probe_lists(lists, queries, min(cfg.list_probe, nlist), pool, invariant)
        # an image's home list is the nearest list of its variant 0: the queries' first probe when they are the index
        home = probes[:, 0, 0] if same else lists.search(route_rows(base, pool, invariant), 1)[1][:, 0]
        del base
    order = np.argsort(home, kind="stable")
    index = Prints(index_thumbs[order, :1], (icentre[0][order, :1], icentre[1][order, :1]))
    qv, mi, si = search_members(queries, probes, index, order, home[order], k, threshold,
                                same_ids=np.arange(nq) if same else None, chunk_cells=chunk_cells)
    if len(qv) == 0:
        return qv, mi, si
    return best_pairs(qv, mi, si, k, nv)


def _directed_candidates(query_views: np.ndarray, index_views: np.ndarray, cfg: DedupConfig, same: bool):
    """(query row, index row, view cosine, view) of each query image's ``cfg.candidates`` most similar index
    images per view above ``cfg.candidate_threshold``: views (N, V, s, s) uint8, each view searched on its own
    (``_dihedral_search`` with one 'zoom': the view's 8 flips/rotations against the index images' same view)."""
    out = []
    for v in range(query_views.shape[1]):
        # each flip/rotation keeps its `candidates` best; the image's best are among them
        q, i, sim = _dihedral_search(query_views[:, v:v + 1], index_views[:, v:v + 1], cfg.candidates,
                                     cfg.candidate_threshold, cfg, same)
        top = _top_per_group(q, sim, i, cfg.candidates)
        out.append((q[top], i[top], sim[top], np.full(len(top), v, np.int8)))
    return tuple(np.concatenate(x) for x in zip(*out))


def _merge_candidates(a, b, sim, view) -> tuple[np.ndarray, ...]:
    """Each (a, b) once, with its best view cosine and that view; sorted by (a, b)."""
    if not len(a):
        return a, b, sim.astype(np.float32), view
    key = a.astype(np.int64) * (int(b.max()) + 1) + b
    o = np.lexsort((-sim, key))
    first = np.r_[True, key[o][1:] != key[o][:-1]]
    sel = o[first]
    return a[sel], b[sel], sim[sel].astype(np.float32), view[sel]


def candidate_pairs(views: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, ...]:
    """Candidate pairs (a < b, view cosine, view) among images with views (N, V, s, s) (step 1, module docstring)."""
    q, i, sim, view = _directed_candidates(views, views, cfg, same=True)
    return _merge_candidates(np.minimum(q, i), np.maximum(q, i), sim, view)


def cross_candidate_pairs(train_views: np.ndarray, eval_views: np.ndarray, cfg: DedupConfig) -> tuple[np.ndarray, ...]:
    """Leakage candidates (training row, evaluation row, view cosine, view), searched both ways (each training image's
    best evaluation images and each evaluation image's best training images), so a copy is found whichever of the
    two is the query that finds it."""
    t, e, s1, v1 = _directed_candidates(train_views, eval_views, cfg, same=False)
    e2, t2, s2, v2 = _directed_candidates(eval_views, train_views, cfg, same=False)
    return _merge_candidates(np.concatenate([t, t2]), np.concatenate([e, e2]), np.concatenate([s1, s2]),
                             np.concatenate([v1, v2]))


def verify(prints: dict, a: np.ndarray, b: np.ndarray, sim: np.ndarray, view: np.ndarray,
           prints_b: dict | None = None) -> Pairs:
    """Step 2 (``verification.verify_pairs``) for candidate pairs of rows a of ``prints`` and rows b of ``prints_b``
    (default: ``prints``); fingerprints as ``features.fingerprint.fingerprint_batch`` gives them."""
    from cytoray.curation.verification import verify_pairs

    if not len(a):
        return Pairs.empty()
    if prints_b is not None:  # two sets: verify on their concatenation
        offset = len(prints["size"])
        prints = {k: np.concatenate([prints[k], prints_b[k]]) for k in VERIFY_KEYS}
        b = b + offset
    sides = prints["size"].min(1).astype(np.float64)
    score, trans, _ = verify_pairs(prints, sides, a, b)
    return Pairs(a, b, sim, view, score, trans)


VERIFY_KEYS = ("views", "frames", "verify", "size")


def near_duplicate_pairs(prints: dict, cfg: DedupConfig) -> Pairs:
    """Candidate pairs (a < b) among the images of ``prints`` with their verification (both steps)."""
    return verify(prints, *candidate_pairs(prints["views"], cfg))


def leakage_pairs(train: dict, evals: dict, cfg: DedupConfig) -> Pairs:
    """Leakage candidates with their verification: ``a`` an evaluation row, ``b`` a training row (the transform maps
    the training image onto the evaluation image)."""
    t, e, sim, view = cross_candidate_pairs(train["views"], evals["views"], cfg)
    pairs = verify(evals, e, t, sim, view, prints_b=train)
    return pairs._replace(b=t)


def component_pairs(rank: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs to verify besides the candidates: within each group of images linked by verified edges (a, b) — rows
    ranked by ``rank`` (lower = kept first) — every member with the group's first image, where that pair is not an
    edge yet. Each image proposes only its best candidates, so three copies of one picture may link as a chain
    (a1 - a2 - a0); the no-chaining rule removes an image only for an edge to a kept image, which this adds.
    Returns (member, first) rows, sorted (min, max)."""
    if not len(a):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    parent = np.arange(len(nodes))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(inv[:len(a)].tolist(), inv[len(a):].tolist()):
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    root = np.array([find(x) for x in range(len(nodes))])
    first = {}
    for x in np.argsort(rank[nodes], kind="stable").tolist():
        first.setdefault(root[x], x)
    have = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    out = []
    for x in range(len(nodes)):
        f = first[root[x]]
        if f != x:
            pair = (min(nodes[x], nodes[f]), max(nodes[x], nodes[f]))
            if pair not in have:
                out.append(pair)
    out = np.array(out, np.int64).reshape(-1, 2)
    return out[:, 0], out[:, 1]


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


def transform_text(pairs: Pairs, i: int, removed_is_a: bool) -> str:
    """The transform of pair i in words, as the removed image relates to the one it duplicates."""
    from cytoray.curation.verification import Transform

    d, sx, sy, tx, ty = pairs.transform[i].tolist()
    t = Transform(int(d), sx, sy, tx, ty)
    return (t.inverse() if removed_is_a else t).describe()


def deduplicate(manifest, cfg: DedupConfig, prints: dict | None = None) -> tuple[np.ndarray, list[dict], Pairs]:
    """manifest: pandas DataFrame (image_id, pixel_sha256, cell_type, width, height, dataset), rows aligned with
    ``prints`` (``features.fingerprint.fingerprint_batch``). Near duplicates need the fingerprints (without them only
    exact copies are found). Returns (keep mask, duplicate rows, the verified candidate pairs); see the module
    docstring for the rules."""
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
    pairs = Pairs.empty()
    if cfg.near and prints is not None and (rep == np.arange(n)).sum() > 1:
        pairs = near_duplicate_pairs(prints, cfg)
        linked = pairs.take(pairs.verified(cfg.threshold))
        extra_a, extra_b = component_pairs(rank, linked.a, linked.b)
        nan = np.full(len(extra_a), np.nan, np.float32)
        pairs = Pairs.concat([pairs, verify(prints, extra_a, extra_b, nan, np.full(len(extra_a), -1, np.int8))])
    edges = pairs.take(pairs.verified(cfg.threshold))
    keep, dup_of, sim, exact = resolve(rank, rep, edges.a, edges.b, edges.score)
    dups = duplicate_rows(ids, keep, dup_of, sim, exact, edges)
    log.info("dedup: %d images, %d duplicates (%d exact); %d candidate pairs verified", n, len(dups),
             int(exact.sum()), len(pairs.a))
    return keep, dups, pairs


def duplicate_rows(ids: list[str], keep, dup_of, sim, exact, edges: Pairs) -> list[dict]:
    """duplicates.parquet rows of the removed rows (``resolve``'s output), each with the transform of its edge to
    the image it duplicates (exact copies: identical pixels)."""
    edge_of = {(int(a), int(b)): k for k, (a, b) in enumerate(zip(edges.a.tolist(), edges.b.tolist()))}
    rows = []
    for m in np.flatnonzero(~keep).tolist():
        t = int(dup_of[m])
        if exact[m]:
            how = "identical pixels"
        else:
            k = edge_of.get((m, t), edge_of.get((t, m)))
            how = transform_text(edges, k, removed_is_a=edges.a[k] == m) if k is not None else \
                "identical pixels to a near duplicate"  # an exact copy of a removed image points past it
        rows.append({"image_id": ids[m], "duplicate_of": ids[t], "similarity": float(sim[m]),
                     "reason": "exact" if exact[m] else "near_duplicate", "transform": how})
    return rows


def read_eval_manifest(uri: str, storage_cfg=None):
    """An evaluation manifest as a pyarrow table (image_id, uri); image_id defaults to the uri."""
    import pyarrow as pa

    from cytoray.manifest import read_manifest

    table = read_manifest(uri, storage_cfg, ("uri",), optional=("image_id",), purpose="dedup.eval_manifests",
                          fix="an evaluation manifest lists its images by uri, like manifest.parquet",
                          allow_empty=True)
    ids = table.column("image_id") if "image_id" in table.column_names else table.column("uri")
    return pa.table({"image_id": pa.array([f"{i}" for i in ids.to_pylist()]), "uri": table.column("uri")})


def leakage_guard(train: dict, eval_sets: list[tuple[str, list[str], dict]], cfg: DedupConfig):
    """({train row: (eval image id, eval set name, score, transform)} for every training row with a verified copy
    among the evaluation images (the best-scoring one over all sets), [the verified candidate pairs per set])."""
    hits: dict[int, tuple[str, str, float, str]] = {}
    checked = []
    for name, eval_ids, evals in eval_sets:
        if len(eval_ids) == 0 or len(train["size"]) == 0:
            checked.append(Pairs.empty())
            continue
        pairs = leakage_pairs(train, evals, cfg)
        checked.append(pairs)
        for k in np.flatnonzero(pairs.verified(cfg.leakage_threshold)).tolist():
            t, v = int(pairs.b[k]), float(pairs.score[k])
            if t not in hits or v > hits[t][2]:
                hits[t] = (eval_ids[int(pairs.a[k])], name, v, transform_text(pairs, k, removed_is_a=False))
    return hits, checked


def remove_leakage_and_duplicates(frame, prints: dict | None, eval_sets: list[tuple[str, list[str], dict]],
                                  cfg: DedupConfig):
    """The dedup stage's decisions (module docstring): leakage over every row first, then exact and near
    duplicates among the rest. ``eval_sets``: (name, image ids, fingerprints) per evaluation manifest. Returns
    (keep mask, duplicate rows with dataset and duplicate_of_dataset, verified candidate pairs: near-duplicate
    pairs in frame rows, then leakage pairs per set)."""
    n = len(frame)
    ids, datasets = frame["image_id"].tolist(), frame["dataset"].tolist()
    leaked = np.zeros(n, bool)
    dups: list[dict] = []
    checked: list[Pairs] = []
    if eval_sets and prints is not None:
        hits, checked = leakage_guard(prints, eval_sets, cfg)
        for r in sorted(hits):
            eval_id, name, v, how = hits[r]
            leaked[r] = True
            dups.append({"image_id": ids[r], "duplicate_of": eval_id, "similarity": v, "reason": "leakage",
                         "transform": how, "dataset": datasets[r], "duplicate_of_dataset": name})
        log.info("leakage guard: %d training images dropped as copies of %d evaluation images",
                 len(hits), sum(len(e[1]) for e in eval_sets))
    rest = np.flatnonzero(~leaked)
    sub = None if prints is None else {k: v[rest] for k, v in prints.items()}
    keep_rest, rest_dups, pairs = deduplicate(frame.iloc[rest].reset_index(drop=True), cfg, prints=sub)
    dataset_of = dict(zip(ids, datasets))
    for d in rest_dups:
        d["dataset"], d["duplicate_of_dataset"] = dataset_of[d["image_id"]], dataset_of[d["duplicate_of"]]
    keep = np.zeros(n, bool)
    keep[rest[keep_rest]] = True
    pairs = pairs._replace(a=rest[pairs.a], b=rest[pairs.b])
    return keep, dups + rest_dups, [pairs, *checked]
