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
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np

from cytoray.curation.dedup import gpu_count

log = logging.getLogger(__name__)


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
    max_train_points: int = 256  # faiss: training points per centroid (subsampled above)
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


def kmeans_with_resampling(x: np.ndarray, k: int, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One level: faiss k-means, then ``cfg.resample_steps`` resampling-clustering steps.
    Returns (centroids (k, d), labels (n,))."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    gpu = cfg.use_gpu and gpu_count() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=cfg.niter, seed=seed, max_points_per_centroid=cfg.max_train_points,
                      min_points_per_centroid=1, gpu=gpu, verbose=False)
    km.train(x)
    centroids = km.centroids.copy()
    labels, dist = _assign(x, centroids, gpu)
    for _ in range(cfg.resample_steps):
        # S = the r points of every cluster closest to its centroid: each cluster weighs the same in S
        # however dense its region, so k-means on S moves surplus centroids out of dense regions.
        order = np.lexsort((dist, labels))  # by cluster, closest first
        sorted_labels = labels[order]
        starts = np.searchsorted(sorted_labels, np.arange(k))
        ends = np.minimum(np.searchsorted(sorted_labels, np.arange(k), side="right"), starts + cfg.resample_points)
        sample = np.concatenate([order[a:b] for a, b in zip(starts, ends)])
        if len(sample) <= k:
            break
        km = faiss.Kmeans(x.shape[1], k, niter=cfg.niter, seed=seed, min_points_per_centroid=1,
                          max_points_per_centroid=max(cfg.max_train_points, cfg.resample_points), gpu=gpu,
                          verbose=False)
        km.train(x[sample])
        centroids = km.centroids.copy()
        labels, dist = _assign(x, centroids, gpu)
    return centroids, labels


@dataclass
class Hierarchy:
    levels: list[int]  # effective k per level, finest first
    labels: np.ndarray  # (n, T) int64: cluster id of every point at every level
    centroids: list[np.ndarray] = field(default_factory=list)  # per level

    def column_names(self) -> list[str]:
        return [f"cluster_l{t + 1}" for t in range(len(self.levels))]


def hierarchical_kmeans(x: np.ndarray, cfg: ClusterConfig) -> Hierarchy:
    """Cluster ids of every row of ``x`` at every level (finest first)."""
    n = len(x)
    levels = scaled_levels(n, list(cfg.levels), cfg.min_cluster_size)
    if not levels:
        log.warning("cluster: %d points are too few for k-means at min_cluster_size=%d; one cluster",
                    n, cfg.min_cluster_size)
        return Hierarchy([1], np.zeros((n, 1), np.int64), [x.mean(0, keepdims=True).astype(np.float32)])
    labels = np.zeros((n, len(levels)), np.int64)
    points, to_point = x, np.arange(n)
    centroids = []
    for t, k in enumerate(levels):
        c, lab = kmeans_with_resampling(points, k, cfg, seed=cfg.seed + t)
        labels[:, t] = lab[to_point]  # each image follows its level-(t-1) cluster
        centroids.append(c)
        points, to_point = c, labels[:, t]
        log.info("cluster: level %d k=%d (%d non-empty)", t + 1, k, len(np.unique(labels[:, t])))
    return Hierarchy(levels, labels, centroids)


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
        ids, emb, _ = load_embeddings(out_uri, storage_cfg)
    pos = {k: i for i, k in enumerate(ids)}
    missing = [k for k in image_ids if k not in pos]
    if missing:
        raise ValueError(f"{len(missing)} images have no embedding (first: {missing[:3]}); rerun the embed stage "
                         "or complete the embeddings file")
    emb = emb[[pos[k] for k in image_ids]]
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def run_cluster(out_uri: str, cfg: ClusterConfig, storage_cfg=None, force: bool = False,
                embeddings: str | None = None,
                scale=None) -> dict:
    """Cluster stage: ``deduplicated.parquet`` + embeddings -> ``clusters.parquet`` (image_id, cluster_l1 ...
    cluster_lT), the centroids in ``centroids_l<t>.npy``."""
    from cytoray.curation.stage import run_stage

    settings = {"cluster": cfg, "embeddings": embeddings}
    return run_stage("cluster", out_uri, settings, lambda run: _cluster(run, cfg, embeddings, storage_cfg),
                     storage_cfg, force)


def _cluster(run, cfg: ClusterConfig, embeddings: str | None, storage_cfg) -> dict:
    import pyarrow as pa

    ids = run.read("deduplicated.parquet", ["image_id"]).column("image_id").to_pylist()
    emb = load_stage_embeddings(run.out_uri, ids, embeddings, storage_cfg)
    h = hierarchical_kmeans(emb, cfg) if cfg.enabled else Hierarchy([1], np.zeros((len(ids), 1), np.int64))
    cols = {"image_id": pa.array(ids, pa.string())}
    cols.update({name: pa.array(h.labels[:, t], pa.int32()) for t, name in enumerate(h.column_names())})
    run.publish("clusters.parquet", pa.table(cols))
    for t, c in enumerate(h.centroids):
        buf = io.BytesIO()
        np.save(buf, c.astype(np.float32))
        run.publish_bytes(f"centroids_l{t + 1}.npy", buf.getvalue())
    sizes = [np.bincount(h.labels[:, t]) for t in range(h.labels.shape[1])]
    meta = {"stage": "cluster", "requested_levels": list(cfg.levels), "levels": h.levels,
            "columns": h.column_names(), "images": len(ids),
            "cluster_sizes": [{"min": int(s[s > 0].min()) if len(s) else 0, "max": int(s.max()) if len(s) else 0,
                               "non_empty": int((s > 0).sum())} for s in sizes],
            "resample_steps": cfg.resample_steps}
    log.info("cluster: %d images, levels %s", len(ids), h.levels)
    return meta
