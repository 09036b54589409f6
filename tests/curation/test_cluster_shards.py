"""The cluster stage over shards of the run's embeddings: Ray tasks and this process give identical labels and
centroids, the sharded path matches the in-memory k-means it replaces, and a Ray-mode ``clusters.parquet`` is a
directory of parts in ``deduplicated.parquet`` order."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from cytoray.curation.cluster import ClusterConfig, closest_per_cluster, hierarchical_kmeans, run_cluster
from cytoray.curation.shards import KEPT_MASK, ScaleConfig, publish_mask
from cytoray.curation.stage import StageRun
from cytoray.tables import pack_vectors, read_table

N, D, TRUE_K = 3000, 16, 20
# max_train_points=64: 20 * 64 = 1,280 training rows of ~2,550 kept, so the training sample is a real subsample
CFG = ClusterConfig(levels=[20, 4], max_train_points=64, resample_steps=2, resample_points=10, seed=3,
                    use_gpu=False)
# 500 rows per shard: 6 shards crossing 256-row row groups; 3 in flight: the resampling merge runs in 2 rounds
SCALE = {"shard_rows": 500, "max_in_flight": 3}


def _synthetic_run(out, seed=0):
    """A run directory as dedup leaves it: embeddings.parquet (all rows), deduplicated.parquet (kept rows),
    kept_rows.npy and dedup's marker. 20 well-separated clusters in 16 dims, ~15% of rows dropped."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((TRUE_K, D)) * 5
    x = (centres[rng.integers(0, TRUE_K, N)] + 0.3 * rng.standard_normal((N, D))).astype(np.float32)
    kept = rng.random(N) > 0.15
    ids = np.array([f"img{i:05d}" for i in range(N)])
    (out / "_stages").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ids, "embedding": pack_vectors(x)}), out / "embeddings.parquet",
                   row_group_size=256)
    pq.write_table(pa.table({"image_id": ids[kept]}), out / "deduplicated.parquet", row_group_size=256)
    publish_mask(StageRun("dedup", str(out)), KEPT_MASK, kept)
    (out / "_stages" / "dedup.json").write_text(json.dumps({"stage": "dedup", "lineage": "synthetic"}))
    x = x[kept]
    return ids[kept], x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """The same synthetic run clustered in this process and as Ray tasks."""
    out = {}
    for mode in ("local", "ray"):
        path = tmp_path_factory.mktemp(f"cluster-{mode}")
        ids, x = _synthetic_run(path)
        meta = run_cluster(str(path), CFG, scale=ScaleConfig(mode=mode, **SCALE))
        out[mode] = {"path": path, "ids": ids, "x": x, "meta": meta}
    return out


def _old_hierarchical_kmeans(x, cfg):
    """The in-memory algorithm before sharding (faiss subsamples the training rows itself), for comparison."""
    import faiss

    def assign(points, c):
        index = faiss.IndexFlatL2(c.shape[1])
        index.add(c)
        dist, lab = index.search(points, 1)
        return lab[:, 0], dist[:, 0]

    def level(points, k, seed):
        km = faiss.Kmeans(points.shape[1], k, niter=cfg.niter, seed=seed, max_points_per_centroid=cfg.max_train_points,
                          min_points_per_centroid=1, verbose=False)
        km.train(points)
        c = km.centroids.copy()
        labels, dist = assign(points, c)
        for _ in range(cfg.resample_steps):
            order = np.lexsort((dist, labels))
            starts = np.searchsorted(labels[order], np.arange(k))
            ends = np.minimum(np.searchsorted(labels[order], np.arange(k), side="right"), starts + cfg.resample_points)
            sample = np.concatenate([order[a:b] for a, b in zip(starts, ends)])
            km = faiss.Kmeans(points.shape[1], k, niter=cfg.niter, seed=seed, min_points_per_centroid=1,
                              max_points_per_centroid=max(cfg.max_train_points, cfg.resample_points), verbose=False)
            km.train(points[sample])
            c = km.centroids.copy()
            labels, dist = assign(points, c)
        return c, labels

    c1, l1 = level(np.ascontiguousarray(x, np.float32), cfg.levels[0], cfg.seed)
    _, parent = level(c1, cfg.levels[1], cfg.seed + 1)
    return np.stack([l1, parent[l1]], axis=1)


def test_ray_tasks_and_this_process_give_identical_clusters(runs):
    local, ray = runs["local"], runs["ray"]
    a = read_table(str(local["path"] / "clusters.parquet"))
    b = read_table(str(ray["path"] / "clusters.parquet"))
    assert a.column_names == ["image_id", "cluster_l1", "cluster_l2"] and a.equals(b)
    for t in (1, 2):
        ca, cb = (np.load(r["path"] / f"centroids_l{t}.npy") for r in (local, ray))
        assert ca.shape == (CFG.levels[t - 1], D) and np.array_equal(ca, cb)
    summary = [{k: v for k, v in r["meta"].items() if k != "seconds"} for r in (local, ray)]
    assert summary[0] == summary[1] and summary[0]["levels"] == [20, 4] and summary[0]["images"] == len(local["ids"])


def test_ray_mode_writes_a_directory_of_parts_in_row_order(runs):
    ray, local = runs["ray"], runs["local"]
    out = ray["path"] / "clusters.parquet"
    assert out.is_dir() and len(list(out.glob("part-*.parquet"))) == -(-len(ray["ids"]) // SCALE["shard_rows"])
    assert (local["path"] / "clusters.parquet").is_file()
    assert read_table(str(out), columns=["image_id"]).column("image_id").to_pylist() == ray["ids"].tolist()


def test_sharded_path_matches_the_in_memory_kmeans(runs):
    local = runs["local"]
    old = _old_hierarchical_kmeans(local["x"], CFG)
    # arrays keep the in-memory path: the same faiss calls on the same rows as before
    assert np.array_equal(hierarchical_kmeans(local["x"], CFG).labels, old)
    new = read_table(str(local["path"] / "clusters.parquet"))
    for t in range(2):
        ari = adjusted_rand_score(old[:, t], new.column(f"cluster_l{t + 1}").to_numpy())
        print(f"level {t + 1}: adjusted Rand index sharded vs in-memory = {ari:.4f}")
        assert ari >= 0.95


def test_merged_shard_picks_equal_the_global_pick():
    rng = np.random.default_rng(1)
    labels, dist = rng.integers(0, 7, 500), rng.integers(0, 20, 500).astype(np.float32)  # many distance ties
    positions = np.arange(500)
    want = closest_per_cluster(labels, dist, positions, 4)
    best = None
    for part in np.array_split(positions, 5):
        pick = part[closest_per_cluster(labels[part], dist[part], part, 4)]
        merged = pick if best is None else np.concatenate([best, pick])
        best = merged[closest_per_cluster(labels[merged], dist[merged], merged, 4)]
    assert np.array_equal(best, want) and np.bincount(labels[want]).max() == 4
