"""Hierarchical k-means with faiss, following Vo et al. 2024 ("Automatic Data Curation for Self-Supervised
Learning: A Clustering-Based Approach", arXiv 2405.15613).

Level 1 clusters the embeddings into ``k_1`` clusters; level ``t`` clusters the ``k_{t-1}`` centroids of the
level below into ``k_t`` clusters, so every image gets one cluster id per level (``cluster_l1`` finest ...
``cluster_lT`` coarsest) and the ids form a tree. After the plain k-means of each level come the paper's
*resampling-clustering* steps: from every cluster the ``resample_points`` points closest to its centroid are
drawn, k-means runs afresh on that union (each cluster weighs the same there, so the next centroids follow the
density of centroids, flatter than the density of data), and all points are
reassigned. k-means alone puts many centroids in dense regions
(a big dataset, a common cell type); the resampling pulls centroids towards a uniform cover of the support,
which is what the balanced sampling on top of the tree needs.

Levels are scaled to the data: ``k_t`` is capped so every level-t cluster can hold at least
``min_cluster_size`` points of the level below (``k = [1000, 100, 10]`` on 2,000 images becomes
``[400, 80, 10]``-ish instead of 1000 singleton clusters). The effective levels are recorded.

Every level runs on a *point source*: :class:`InMemoryPoints` (an array: a user's own embeddings, and the
centroids of every level above 1) or :class:`ShardedEmbeddings` (the kept rows of the run's
``embeddings.parquet``, read shard by shard with :func:`cytoray.curation.shards.map_shards`, here or as Ray
tasks). Level 1 on a sharded source keeps only the training sample, ``k * resample_points`` candidate rows and
one int32 label per image in the driver, never all embeddings (docs/curation.md, "Cluster", *Scale*).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np

from cytoray.curation.shards import Layout, ScaleConfig

log = logging.getLogger(__name__)


def gpu_count() -> int:
    """GPUs faiss sees (0 with the CPU build)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@dataclass
class ClusterConfig:
    enabled: bool = True
    levels: list[int] = field(default_factory=lambda: [1000, 100, 10])  # k per level, finest first
    min_cluster_size: int = 5  # caps k_t at (points at level t-1) // min_cluster_size
    niter: int = 20  # k-means iterations per level
    # Vo et al. resampling-clustering steps per level (0: plain k-means). They move centroids out of dense
    # modes, so the balanced sample covers cell types and datasets more evenly (benchmarks/RESULTS.md).
    resample_steps: int = 3
    resample_points: int = 10  # r: points closest to each centroid that define it in a resampling step
    max_train_points: int = 256  # training points per centroid: k * this many rows are drawn (training_sample)
    seed: int = 0
    use_gpu: bool = True  # when faiss has GPUs


def scaled_levels(n: int, levels: list[int], min_cluster_size: int) -> list[int]:
    """k per level capped by the points available at that level; levels that would collapse to k=1 are
    dropped (a single cluster carries no information)."""
    out, points = [], n
    for k in levels:
        k = int(min(k, max(1, points // max(1, min_cluster_size))))
        if k < 2:
            break
        out.append(k)
        points = k
    return out


def _assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (squared L2) of every row: (labels, distances)."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    if use_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, lab = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return lab[:, 0].astype(np.int64), dist[:, 0]


def training_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Positions of the k-means training rows among ``n``: all of them in order when ``n <= size``, else the first
    ``size`` of faiss's own permutation for ``seed`` — exactly the rows (and their order, which seeds the
    initial centroids) that ``faiss.Kmeans`` subsamples internally with ``max_points_per_centroid``.
    Needs n int32 (4n bytes) while it runs."""
    import faiss

    if n <= size:
        return np.arange(n)
    if n >= 2**31:  # faiss.rand_perm is int32; beyond it a numpy draw of the same size
        return np.random.default_rng(seed).choice(n, size, replace=False)
    perm = np.empty(n, np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed)
    return perm[:size].astype(np.int64)


def closest_per_cluster(labels: np.ndarray, dist: np.ndarray, positions: np.ndarray, r: int) -> np.ndarray:
    """Indices of the ``r`` rows of every cluster closest to its centroid, ordered by cluster, then distance, then
    position (so merging per-shard picks by this rule gives the global pick, in the same order)."""
    order = np.lexsort((positions, dist, labels))
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels)  # rank within its cluster
    return order[rank < r]


def _train(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int, max_points: int) -> np.ndarray:
    """faiss k-means centroids (k, d) of all rows of ``x`` (``max_points`` * k >= len(x): no subsampling)."""
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=cfg.niter, seed=seed, max_points_per_centroid=max_points,
                      min_points_per_centroid=1, gpu=cfg.use_gpu and gpu_count() > 0, verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return km.centroids.copy()


class InMemoryPoints:
    """Rows of an array in this process."""

    def __init__(self, x: np.ndarray, use_gpu: bool = False):
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.rows, self.dim, self.use_gpu = len(self.x), self.x.shape[1], use_gpu

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return self.x[positions]

    def closest(self, centroids: np.ndarray, r: int) -> np.ndarray:
        labels, dist = _assign(self.x, centroids, self.use_gpu)
        return self.x[closest_per_cluster(labels, dist, np.arange(self.rows), r)]

    def assign(self, centroids: np.ndarray) -> np.ndarray:
        return _assign(self.x, centroids, self.use_gpu)[0]

    def mean(self) -> np.ndarray:
        return self.x.mean(0, keepdims=True).astype(np.float32)


def _points(x, cfg: ClusterConfig):
    """A point source: ``x`` itself, or an array wrapped as :class:`InMemoryPoints`."""
    return InMemoryPoints(x, cfg.use_gpu and gpu_count() > 0) if isinstance(x, np.ndarray) else x


def kmeans_with_resampling(x, k: int, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One level on ``x`` (an array or a point source): faiss k-means on :func:`training_sample`, then
    ``cfg.resample_steps`` resampling-clustering steps. Returns (centroids (k, d), labels (n,))."""
    points = _points(x, cfg)
    sample = points.gather(training_sample(points.rows, k * cfg.max_train_points, seed))
    centroids = _train(sample, k, cfg, seed, cfg.max_train_points)
    del sample
    for _ in range(cfg.resample_steps):
        # S = the r points of every cluster closest to its centroid: each cluster weighs the same in S
        # however dense its region, so k-means on S moves surplus centroids out of dense regions.
        sample = points.closest(centroids, cfg.resample_points)
        if len(sample) <= k:
            break
        centroids = _train(sample, k, cfg, seed, max(cfg.max_train_points, cfg.resample_points))
    return centroids, points.assign(centroids)


def tree_labels(finest: np.ndarray, parents: list[np.ndarray]) -> np.ndarray:
    """(n, T) int64 cluster ids per level from the level-1 ids and each level's parent map."""
    cols = [np.asarray(finest, np.int64)]
    for p in parents:
        cols.append(np.asarray(p, np.int64)[cols[-1]])
    return np.stack(cols, axis=1)


@dataclass
class Hierarchy:
    levels: list[int]  # effective k per level, finest first
    finest: np.ndarray  # (n,) level-1 cluster of every point
    parents: list[np.ndarray] = field(default_factory=list)  # parents[t][c]: level t+2 cluster of level t+1 cluster c
    centroids: list[np.ndarray] = field(default_factory=list)  # per level

    @property
    def labels(self) -> np.ndarray:
        """(n, T) int64: cluster id of every point at every level."""
        return tree_labels(self.finest, self.parents)

    def column_names(self) -> list[str]:
        return [f"cluster_l{t + 1}" for t in range(len(self.levels))]

    def sizes(self) -> list[np.ndarray]:
        """Points per cluster at every level (from the level-1 ids and the parent maps)."""
        out = [np.bincount(self.finest, minlength=self.levels[0])]
        for p, k in zip(self.parents, self.levels[1:]):
            out.append(np.bincount(p, weights=out[-1], minlength=k).astype(np.int64))
        return out


def hierarchical_kmeans(x, cfg: ClusterConfig) -> Hierarchy:
    """Cluster ids of every row of ``x`` (an array or a point source) at every level (finest first)."""
    points = _points(x, cfg)
    n = points.rows
    levels = scaled_levels(n, list(cfg.levels), cfg.min_cluster_size)
    if not levels:
        log.warning("cluster: %d points are too few for k-means at min_cluster_size=%d; one cluster",
                    n, cfg.min_cluster_size)
        return Hierarchy([1], np.zeros(n, np.int64), [], [points.mean()])
    centroids, finest = kmeans_with_resampling(points, levels[0], cfg, seed=cfg.seed)
    h = Hierarchy(levels, finest, [], [centroids])
    for t, k in enumerate(levels[1:], start=1):  # each image follows its level-(t-1) cluster
        c, parent = kmeans_with_resampling(h.centroids[-1], k, cfg, seed=cfg.seed + t)
        h.parents.append(parent)
        h.centroids.append(c)
    for t, (k, s) in enumerate(zip(levels, h.sizes())):
        log.info("cluster: level %d k=%d (%d non-empty)", t + 1, k, int((s > 0).sum()))
    return h


class ShardedEmbeddings:
    """The kept rows of a run's ``embeddings.parquet`` (``kept_rows.npy``), in their order, L2-normalised as
    :func:`load_stage_embeddings` does. Every pass is one :func:`~cytoray.curation.shards.map_shards` over
    row-range shards (here, or as Ray tasks with ``ray_tasks``); the driver keeps the kept-row mask (1 byte per
    row) and what the passes return."""

    def __init__(self, lay: Layout, kept: np.ndarray, scale: ScaleConfig, ray_tasks: bool, storage_cfg=None):
        import pyarrow as pa

        kind = lay.schema.field("embedding").type
        if not pa.types.is_fixed_size_list(kind):
            raise ValueError(f"{lay.uri}: column embedding is {kind}, expected a fixed-size list (the embed stage "
                             "writes one); rerun the embed stage")
        self.layout, self.scale, self.ray_tasks, self.storage_cfg = lay, scale, ray_tasks, storage_cfg
        self.rows, self.dim = int(kept.sum()), kind.list_size
        firsts = np.concatenate([[0], np.cumsum(kept)])
        # (start, stop, first kept position, kept mask of rows [start, stop))
        self.shards = [(a, b, int(firsts[a]), kept[a:b]) for a, b in lay.ranges(scale.shard_rows)]

    def _map(self, fn, shards, *args, desc: str) -> list:
        from cytoray.curation.shards import map_shards

        return map_shards(fn, shards, self.layout, *args, self.storage_cfg, ray_tasks=self.ray_tasks,
                          cfg=self.scale, desc=desc, rows=lambda s: s[1] - s[0])

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """Rows at kept ``positions`` (in that order): one pass, each shard returns its rows among them."""
        order = np.argsort(positions, kind="stable")
        out = np.empty((len(positions), self.dim), np.float32)
        done = 0
        for part in self._map(_gather_rows, self.shards, positions[order], desc="cluster: training sample"):
            out[order[done:done + len(part)]] = part
            done += len(part)
        return out

    def closest(self, centroids: np.ndarray, r: int) -> np.ndarray:
        """The ``r`` rows closest to every centroid (:func:`closest_per_cluster`): each shard returns its own
        picks; the driver merges them, ``max_in_flight`` shards at a time, keeping at most k * r rows."""
        best = None
        step = max(1, self.scale.max_in_flight)
        for i in range(0, len(self.shards), step):
            for part in self._map(_closest_rows, self.shards[i:i + step], centroids, r,
                                  desc="cluster: resampling"):
                merged = part if best is None else tuple(np.concatenate(ab) for ab in zip(best, part))
                pos, lab, dist, _ = merged
                best = tuple(a[closest_per_cluster(lab, dist, pos, r)] for a in merged)
        return best[3]

    def assign(self, centroids: np.ndarray) -> np.ndarray:
        """(n,) int32 nearest centroid of every kept row."""
        return np.concatenate(self._map(_assign_rows, self.shards, centroids, desc="cluster: assign"))

    def mean(self) -> np.ndarray:
        total = sum(self._map(_sum_rows, self.shards, desc="cluster: mean"))
        return (total / max(1, self.rows))[None].astype(np.float32)


def _shard_embeddings(shard, lay: Layout, storage_cfg) -> np.ndarray:
    """(kept rows of the shard, d) float32, L2-normalised."""
    from cytoray.curation.shards import read_rows
    from cytoray.tables import unpack_vectors

    start, stop, _, kept = shard
    x = unpack_vectors(read_rows(lay, start, stop, ["embedding"], storage_cfg).column("embedding"))[kept]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _gather_rows(shard, lay: Layout, positions: np.ndarray, storage_cfg) -> np.ndarray:
    """The shard's rows at the sorted kept ``positions`` that fall in it (reads nothing when none do)."""
    first, count = shard[2], int(shard[3].sum())
    a, b = np.searchsorted(positions, [first, first + count])
    if a == b:
        return np.zeros((0, lay.schema.field("embedding").type.list_size), np.float32)
    return _shard_embeddings(shard, lay, storage_cfg)[positions[a:b] - first]


def _closest_rows(shard, lay: Layout, centroids: np.ndarray, r: int, storage_cfg):
    """(positions, labels, distances, rows) of the shard's ``r`` rows closest to every centroid."""
    x = _shard_embeddings(shard, lay, storage_cfg)
    labels, dist = _assign(x, centroids, use_gpu=False)
    positions = shard[2] + np.arange(len(x))
    i = closest_per_cluster(labels, dist, positions, r)
    return positions[i], labels[i], dist[i], x[i]


def _assign_rows(shard, lay: Layout, centroids: np.ndarray, storage_cfg) -> np.ndarray:
    return _assign(_shard_embeddings(shard, lay, storage_cfg), centroids, use_gpu=False)[0].astype(np.int32)


def _sum_rows(shard, lay: Layout, storage_cfg) -> np.ndarray:
    return _shard_embeddings(shard, lay, storage_cfg).sum(0, dtype=np.float64)


def load_stage_embeddings(out_uri: str, image_ids: list[str], source: str | None, storage_cfg=None) -> np.ndarray:
    """Embeddings aligned with ``image_ids``: from the run's ``embeddings.parquet`` (default) or a user's own
    (``source``: a Parquet file with image_id + embedding, or an .npy whose rows follow ``image_ids``)."""

    from cytoray import storage
    from cytoray.curation.embed import load_embeddings
    from cytoray.tables import read_table, unpack_vectors

    if source and source.endswith(".npy"):
        x = np.load(io.BytesIO(storage.read_bytes(source, storage_cfg)))
        if x.ndim != 2 or len(x) != len(image_ids):
            raise ValueError(f"cluster.embeddings {source}: shape {x.shape}, expected ({len(image_ids)}, D) — one row "
                             "per row of deduplicated.parquet, in its order")
        ids, emb = list(image_ids), x.astype(np.float32)
    elif source:
        t = read_table(source, storage_cfg)
        if not {"image_id", "embedding"} <= set(t.column_names):
            raise ValueError(f"cluster.embeddings {source}: needs columns image_id and embedding "
                             f"(found {t.column_names})")
        ids = t.column("image_id").to_pylist()
        emb = unpack_vectors(t.column("embedding"))
    else:
        ids, emb, _ = load_embeddings(out_uri, storage_cfg, fingerprints=False)
    pos = {k: i for i, k in enumerate(ids)}
    missing = [k for k in image_ids if k not in pos]
    if missing:
        raise ValueError(f"{len(missing)} images have no embedding (first: {missing[:3]}); rerun the embed stage "
                         "or complete the embeddings file")
    emb = emb[[pos[k] for k in image_ids]]
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def run_cluster(out_uri: str, cfg: ClusterConfig, storage_cfg=None, force: bool = False,
                embeddings: str | None = None, scale: ScaleConfig | None = None) -> dict:
    """Cluster stage: ``deduplicated.parquet`` + embeddings -> ``clusters.parquet`` (image_id, cluster_l1 ...
    cluster_lT, rows in ``deduplicated.parquet`` order), the centroids in ``centroids_l<t>.npy``.

    The run's own embeddings are read shard by shard (:class:`ShardedEmbeddings`), here or as Ray tasks
    (``scale``; both give the same labels), and with Ray tasks ``clusters.parquet`` is a directory written one
    part per shard. A user's ``embeddings`` source is loaded whole and clustered in this process. ``scale``
    picks where the work runs, not what it computes, so it is not part of the stage's settings."""
    from cytoray.curation.stage import run_stage

    settings = {"cluster": cfg, "embeddings": embeddings}
    scale = scale or ScaleConfig()
    return run_stage("cluster", out_uri, settings, lambda run: _cluster(run, cfg, embeddings, scale, storage_cfg),
                     storage_cfg, force)


def _clusters_table(ids, finest: np.ndarray, parents: list[np.ndarray], names: list[str]):
    import pyarrow as pa

    labels = tree_labels(finest, parents)
    cols = {"image_id": ids.cast(pa.string())}
    cols.update({name: pa.array(labels[:, t], pa.int32()) for t, name in enumerate(names)})
    return pa.table(cols)


def _write_clusters_part(part, lay: Layout, out: str, parents: list[np.ndarray], names: list[str],
                         storage_cfg) -> int:
    """One file of a multi-file ``clusters.parquet``: rows [start, stop) of deduplicated.parquet."""
    from cytoray.curation.shards import read_rows, write_part

    index, start, stop, finest = part
    ids = read_rows(lay, start, stop, ["image_id"], storage_cfg).column("image_id").combine_chunks()
    write_part(out, index, _clusters_table(ids, finest, parents, names), storage_cfg)
    return stop - start


def _stage_points(run, scale: ScaleConfig, storage_cfg) -> tuple[ShardedEmbeddings, Layout]:
    """The kept rows of embeddings.parquet as a sharded source, checked against deduplicated.parquet."""
    from cytoray import storage
    from cytoray.curation.shards import KEPT_MASK, layout, load_mask, use_ray
    from cytoray.errors import UserError

    if not storage.exists(run.uri(KEPT_MASK), storage_cfg):
        raise UserError(f"{run.uri(KEPT_MASK)} is missing: the dedup stage of this run predates it; rerun dedup "
                        "(force=true)")
    kept = load_mask(run.out_uri, storage_cfg=storage_cfg)
    emb, dedup = layout(run.uri("embeddings.parquet"), storage_cfg), layout(run.uri("deduplicated.parquet"), storage_cfg)
    if len(kept) != emb.rows or int(kept.sum()) != dedup.rows:
        raise UserError(f"{KEPT_MASK} ({len(kept)} rows, {int(kept.sum())} kept) does not match embeddings.parquet "
                        f"({emb.rows} rows) and deduplicated.parquet ({dedup.rows} rows) in {run.out_uri}; "
                        "rerun dedup (force=true)")
    return ShardedEmbeddings(emb, kept, scale, use_ray(scale, dedup.rows), storage_cfg), dedup


def _cluster(run, cfg: ClusterConfig, embeddings: str | None, scale: ScaleConfig, storage_cfg) -> dict:
    from cytoray.curation.shards import map_shards, remove

    out = run.uri("clusters.parquet")
    remove(out, storage_cfg)  # a file (this process) or a directory of parts (Ray tasks) from an earlier run
    if embeddings or not cfg.enabled:  # a user's own embeddings: loaded whole, as before
        ids = run.read("deduplicated.parquet", ["image_id"]).column("image_id")
        h = Hierarchy([1], np.zeros(len(ids), np.int64))
        if cfg.enabled:
            h = hierarchical_kmeans(load_stage_embeddings(run.out_uri, ids.to_pylist(), embeddings, storage_cfg), cfg)
        run.publish("clusters.parquet", _clusters_table(ids, h.finest, h.parents, h.column_names()), sort=False)
    else:
        points, dedup = _stage_points(run, scale, storage_cfg)
        h = hierarchical_kmeans(points, cfg)
        if points.ray_tasks:
            parts = [(i, a, b, h.finest[a:b]) for i, (a, b) in enumerate(dedup.ranges(scale.shard_rows))]
            map_shards(_write_clusters_part, parts, dedup, out, h.parents, h.column_names(), storage_cfg,
                       ray_tasks=True, cfg=scale, desc="cluster: write", rows=lambda p: p[2] - p[1])
        else:
            ids = run.read("deduplicated.parquet", ["image_id"]).column("image_id")
            run.publish("clusters.parquet", _clusters_table(ids, h.finest, h.parents, h.column_names()), sort=False)
    for t, c in enumerate(h.centroids):
        buf = io.BytesIO()
        np.save(buf, c.astype(np.float32))
        run.publish_bytes(f"centroids_l{t + 1}.npy", buf.getvalue())
    sizes = h.sizes()
    meta = {"stage": "cluster", "requested_levels": list(cfg.levels), "levels": h.levels,
            "columns": h.column_names(), "images": len(h.finest),
            "cluster_sizes": [{"min": int(s[s > 0].min()) if s.any() else 0, "max": int(s.max()) if len(s) else 0,
                               "non_empty": int((s > 0).sum())} for s in sizes],
            "resample_steps": cfg.resample_steps}
    log.info("cluster: %d images, levels %s", len(h.finest), h.levels)
    return meta
