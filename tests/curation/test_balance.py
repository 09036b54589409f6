"""Clustering and balancing building blocks: cap search, hierarchical sampling, groups, metrics, k-means tree."""

import numpy as np
import pandas as pd
import pytest

from cytoray.curation.balance import (
    BalanceConfig,
    BalanceError,
    assign_groups,
    cap_allocation,
    distribution_stats,
    hierarchical_sample,
    knn_mixing,
    read_mapping,
)
from cytoray.curation.cluster import ClusterConfig, hierarchical_kmeans, scaled_levels


def test_cap_search_hits_the_target_and_respects_caps():
    sizes = np.array([1000, 300, 40, 5, 1])
    alloc = cap_allocation(sizes, np.ones(5), 500, max_repeat=1)
    assert alloc.sum() == 500
    # a common cap c with sum(min(c, size)) = 500: the small ones get everything, the big ones the same
    assert alloc[2:].tolist() == [40, 5, 1] and abs(int(alloc[0]) - int(alloc[1])) <= 1
    rep = cap_allocation(sizes, np.ones(5), 2000, max_repeat=4)
    assert rep.sum() == 2000 and (rep <= sizes * 4).all() and rep[4] == 4 and rep[3] == 20
    assert cap_allocation(sizes, np.ones(5), 10**9, max_repeat=2).tolist() == (sizes * 2).tolist()  # capped
    w = cap_allocation(np.array([1000, 1000]), np.array([2.0, 1.0]), 300, max_repeat=1)
    assert w.tolist() == [200, 100]
    assert cap_allocation(np.array([10, 10]), np.array([1.0, 0.0]), 15, 4).tolist() == [15, 0]  # weight 0 drops


def test_hierarchical_sample_balances_deterministically():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2], [5000, 500, 50])
    clusters = rng.integers(0, 10, len(groups))
    w = np.ones(len(groups))
    reps = hierarchical_sample([groups, clusters], w, 1500, max_repeat=3, seed=1)
    assert reps.sum() == 1500 and reps.max() <= 3
    per_group = np.bincount(groups, weights=reps)
    assert per_group.tolist() == [675, 675, 150]  # the 50-image group repeated 3x (its cap), the rest split evenly
    assert (reps[groups == 0] <= 1).all()  # the big group is subsampled, never repeated
    assert np.array_equal(reps, hierarchical_sample([groups, clusters], w, 1500, 3, seed=1))
    assert not np.array_equal(reps, hierarchical_sample([groups, clusters], w, 1500, 3, seed=2))


def test_groups_from_metadata_and_mapping_file(tmp_path):
    frame = pd.DataFrame({"dataset": ["a", "a", "b"], "modality": ["pb", "pb", "bm"],
                          "cell_type": ["blast", None, "lymphocyte"], "patient_label": [None, None, "AML"]})
    top = np.array([0, 1, 1])
    g, w = assign_groups(frame, top, BalanceConfig(group_by="cell_type", group_weights={"blast": 3.0}))
    assert g.tolist() == ["blast", "unlabelled", "lymphocyte"] and w.tolist() == [3.0, 1.0, 1.0]
    with pytest.raises(BalanceError, match="group_weights names groups \\['eosinophil'\\]"):
        assign_groups(frame, top, BalanceConfig(group_by="cell_type", group_weights={"eosinophil": 2.0}))
    with pytest.raises(BalanceError, match="group_by='stain'"):
        assign_groups(frame, top, BalanceConfig(group_by="stain"))
    good = tmp_path / "map.csv"
    good.write_text("cluster,group,weight,images\n0,artefacts,0,1\n1,cells,2.5,2\n")
    g, w = assign_groups(frame, top, BalanceConfig(mapping_file=str(good)))
    assert g.tolist() == ["artefacts", "cells", "cells"] and w.tolist() == [0.0, 2.5, 2.5]
    partial = tmp_path / "partial.csv"
    partial.write_text("cluster,group,weight\n0,x,1\n")
    with pytest.raises(BalanceError, match="no row for clusters \\[1\\]"):
        assign_groups(frame, top, BalanceConfig(mapping_file=str(partial)))
    bad = tmp_path / "bad.csv"
    bad.write_text("cluster,name\n0,x\n")
    with pytest.raises(BalanceError, match="columns must include cluster,group,weight"):
        read_mapping(str(bad))
    neg = tmp_path / "neg.csv"
    neg.write_text("cluster,group,weight\n0,x,-1\n")
    with pytest.raises(BalanceError, match="line 2: weight -1.0"):
        read_mapping(str(neg))


def test_balance_metrics():
    u = distribution_stats(["a", "b", "c", "d"])
    assert u["normalized_entropy"] == 1.0 and u["kl_to_uniform"] == 0.0 and u["largest_share"] == 0.25
    skew = distribution_stats(["a"] * 97 + ["b", "c", "d"])
    assert skew["normalized_entropy"] < 0.2 and skew["largest_share"] == 0.97
    assert distribution_stats(["a", "b"], weights=np.array([1.0, 3.0]))["largest_share"] == 0.75
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mixed = knn_mixing(x, rng.integers(0, 3, 600).astype(str), np.ones(600), 10, 5000, 0)
    sep = x + np.repeat(np.eye(16, dtype=np.float32)[:3] * 5, 200, axis=0)
    sep /= np.linalg.norm(sep, axis=1, keepdims=True)
    islands = knn_mixing(sep, np.repeat(["a", "b", "c"], 200), np.ones(600), 10, 5000, 0)
    assert 0.85 < mixed < 1.15 and islands < 0.05


def test_hierarchical_kmeans_ids_form_a_tree():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.3, (200, 8)) for c in range(6)]).astype(np.float32)
    h = hierarchical_kmeans(x, ClusterConfig(levels=[60, 12, 3], resample_steps=2, min_cluster_size=4))
    assert h.levels == [60, 12, 3] and h.labels.shape == (1200, 3)
    for t in range(2):  # every cluster at level t sits inside exactly one cluster at level t+1
        for c in np.unique(h.labels[:, t]):
            assert len(np.unique(h.labels[h.labels[:, t] == c, t + 1])) == 1
    assert scaled_levels(2000, [1000, 100, 10], 5) == [400, 80, 10]
    assert scaled_levels(30, [1000, 100, 10], 5) == [6, 1][:1]
    again = hierarchical_kmeans(x, ClusterConfig(levels=[60, 12, 3], resample_steps=2, min_cluster_size=4))
    assert np.array_equal(h.labels, again.labels)  # deterministic for a seed


def test_bring_your_own_embeddings_npy_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray.curation.cluster import load_stage_embeddings

    ids = ["a", "b", "c"]
    x = np.array([[3, 4], [1, 0], [0, 2]], np.float32)
    np.save(tmp_path / "e.npy", x)
    got = load_stage_embeddings(str(tmp_path), ids, str(tmp_path / "e.npy"))
    assert np.allclose(got, [[0.6, 0.8], [1, 0], [0, 1]])  # normalised, row order kept
    pq.write_table(pa.table({"image_id": ["c", "a", "b"], "embedding": [[0.0, 2.0], [3.0, 4.0], [1.0, 0.0]]}),
                   tmp_path / "e.parquet")
    assert np.allclose(load_stage_embeddings(str(tmp_path), ids, str(tmp_path / "e.parquet")), got)  # by image_id
    with pytest.raises(ValueError, match="shape \\(2, 2\\), expected \\(3, D\\)"):
        np.save(tmp_path / "short.npy", x[:2])
        load_stage_embeddings(str(tmp_path), ids, str(tmp_path / "short.npy"))
    with pytest.raises(ValueError, match="1 images have no embedding"):
        load_stage_embeddings(str(tmp_path), ids + ["d"], str(tmp_path / "e.parquet"))
