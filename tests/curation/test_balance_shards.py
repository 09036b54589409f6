"""The balance stage over shards: Ray tasks and this process give identical outputs, the sampled counts are those
of the in-memory tree, the result is deterministic for a seed, and a directory manifest reads as one."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cytoray import tables
from cytoray.curation import shards
from cytoray.curation.balance import (
    BalanceConfig,
    BalanceError,
    cap_allocation,
    hierarchical_sample,
)
from cytoray.curation.balance_passes import run_balance
from cytoray.curation.shards import ScaleConfig
from cytoray.curation.stage import StageRun

ROWS = 3000


def _write(uri: str, table: pa.Table, parts: int | None) -> None:
    if parts is None:
        pq.write_table(table, uri, row_group_size=500)
        return
    step = -(-table.num_rows // parts)
    for i in range(parts):
        shards.write_part(uri, i, table.slice(i * step, step))


def make_run(out: str, parts: int | None = None) -> str:
    """Stage files as dedup and cluster leave them: ingested/embeddings rows, the kept mask, the kept rows and
    their cluster ids (a 60 -> 12 -> 3 tree); ``parts``: stage files as directories of that many parts."""
    rng = np.random.default_rng(7)
    os.makedirs(os.path.join(out, "_stages"), exist_ok=True)
    ds = np.repeat(["big", "mid", "small"], [2000, 700, 300])
    ids = [f"{d}/img{i:05d}.png" for i, d in enumerate(ds)]
    cell = rng.choice(np.array(["blast", "lymphocyte", None], dtype=object), ROWS)
    emb = rng.normal(size=(ROWS, 8)).astype(np.float32) + (ds == "big")[:, None] * 2.0
    ingested = pa.table({"image_id": ids, "uri": [f"/x/{i}" for i in ids], "dataset": ds.tolist(),
                         "modality": ["peripheral_blood"] * ROWS, "cell_type": pa.array(cell.tolist(), pa.string()),
                         "patient_label": pa.array([None] * ROWS, pa.string())})
    _write(os.path.join(out, "embeddings.parquet"),
           pa.table({"image_id": ids, "embedding": tables.pack_vectors(emb)}), parts)
    keep = np.ones(ROWS, bool)
    keep[::7] = False
    shards.publish_mask(StageRun("dedup", out), shards.KEPT_MASK, keep)
    kept = ingested.filter(pa.array(keep))
    l1 = (rng.integers(0, 20, kept.num_rows) + 20 * (np.asarray(kept.column("dataset")) == "mid")
          + 40 * (np.asarray(kept.column("dataset")) == "small"))
    clusters = pa.table({"image_id": kept.column("image_id"), "cluster_l1": pa.array(l1, pa.int32()),
                         "cluster_l2": pa.array(l1 // 5, pa.int32()), "cluster_l3": pa.array(l1 // 20, pa.int32())})
    _write(os.path.join(out, "deduplicated.parquet"), kept, parts)
    _write(os.path.join(out, "clusters.parquet"), clusters, parts)
    with open(os.path.join(out, "_stages", "cluster.json"), "w") as fh:
        json.dump({"lineage": "synthetic"}, fh)
    return out


def old_hierarchical_sample(keys, node_weight, target, max_repeat, seed):
    """The in-memory tree walk as it was before sharding (rng draw in the leaves): the reference counts."""
    n = len(keys[0])
    repeats = np.zeros(n, np.int64)
    rng = np.random.default_rng(seed)

    def visit(idx, depth, budget):
        if budget <= 0 or len(idx) == 0:
            return
        if depth == len(keys):
            reps = np.full(len(idx), budget // len(idx), np.int64)
            extra = budget - int(reps.sum())
            if extra:
                reps[rng.choice(len(idx), extra, replace=False)] += 1
            repeats[idx] = reps
            return
        k = keys[depth][idx]
        order = np.argsort(k, kind="stable")
        uniq, starts, counts = np.unique(k[order], return_index=True, return_counts=True)
        w = node_weight[idx[order[starts]]] if depth == 0 else np.ones(len(uniq))
        alloc = cap_allocation(counts, w, budget, max_repeat)
        for s, c, a in zip(starts, counts, alloc):
            visit(idx[order[s:s + c]], depth + 1, int(a))

    visit(np.arange(n), 0, target)
    return repeats


def _leaf_sums(table: pa.Table, repeats: np.ndarray) -> dict:
    keys = zip(table.column("group").to_pylist(), table.column("cluster_l3").to_pylist(),
               table.column("cluster_l2").to_pylist(), table.column("cluster_l1").to_pylist())
    out: dict = {}
    for k, r in zip(keys, repeats.tolist()):
        out[k] = out.get(k, 0) + r
    return out


def _old_repeats(table: pa.Table, cfg: BalanceConfig) -> np.ndarray:
    groups = np.array(table.column("group").to_pylist())
    _, code = np.unique(groups, return_inverse=True)
    keys = [code] + [table.column(c).to_numpy().astype(np.int64) for c in ("cluster_l3", "cluster_l2", "cluster_l1")]
    w = table.column("weight").to_numpy().astype(np.float64)
    return old_hierarchical_sample(keys, w, cfg.target_size, cfg.max_repeat, cfg.seed)


CFG = BalanceConfig(target_size=2400, max_repeat=3, group_weights={"small": 2.0}, mixing_sample=500, seed=3)


def _summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "seconds"}


def test_ray_and_local_balance_give_identical_outputs(tmp_path, ray_local):
    local = make_run(str(tmp_path / "local"))
    ray_run = make_run(str(tmp_path / "ray"), parts=4)
    a = run_balance(local, CFG, scale=ScaleConfig(mode="local", shard_rows=700))
    b = run_balance(ray_run, CFG, scale=ScaleConfig(mode="ray", shard_rows=450, max_in_flight=3))
    assert os.path.isfile(os.path.join(local, "unbalanced.parquet"))
    assert len(os.listdir(os.path.join(ray_run, "unbalanced.parquet"))) == 6  # one part per shard
    for name in ("unbalanced.parquet", "balanced.parquet"):
        assert tables.read_table(os.path.join(local, name)).equals(tables.read_table(os.path.join(ray_run, name)))
    assert _summary(a) == _summary(b)
    template = [open(os.path.join(d, "group_mapping_template.csv")).read() for d in (local, ray_run)]
    assert template[0] == template[1] and template[0].count("\n") == 4  # header + 3 top clusters
    assert a["samples_per_epoch"] == 2400 and 0 < a["after"]["knn_dataset_mixing"]
    assert a["after"]["largest_dataset_share"] < a["before"]["largest_dataset_share"]

    # a local run with other shard sizes gives the same rows too (the rule does not depend on the shards)
    again = make_run(str(tmp_path / "again"))
    run_balance(again, CFG, scale=ScaleConfig(mode="local", shard_rows=10_000))
    assert tables.read_table(os.path.join(again, "unbalanced.parquet")).equals(
        tables.read_table(os.path.join(local, "unbalanced.parquet")))


def test_sampled_counts_equal_the_in_memory_tree_and_are_deterministic(tmp_path):
    run = make_run(str(tmp_path / "a"))
    run_balance(run, CFG, scale=ScaleConfig(mode="local", shard_rows=600))
    t = tables.read_table(os.path.join(run, "unbalanced.parquet"))
    new = t.column("repeats").to_numpy().astype(np.int64)
    old = _old_repeats(t, CFG)
    assert _leaf_sums(t, new) == _leaf_sums(t, old)  # per leaf, so per group and cluster too
    assert new.sum() == old.sum() == CFG.target_size and new.max() <= CFG.max_repeat
    # the in-memory function follows the same rule
    keys = [np.unique(np.array(t.column("group").to_pylist()), return_inverse=True)[1]] + \
        [t.column(c).to_numpy().astype(np.int64) for c in ("cluster_l3", "cluster_l2", "cluster_l1")]
    mem = hierarchical_sample(keys, t.column("weight").to_numpy().astype(np.float64), CFG.target_size,
                              CFG.max_repeat, CFG.seed, t.column("image_id").to_pylist())
    assert np.array_equal(mem, new)

    # same seed: same repeats; another seed: other images get the extra repeats, the same counts per leaf
    same = make_run(str(tmp_path / "b"))
    run_balance(same, CFG, scale=ScaleConfig(mode="local", shard_rows=900))
    assert tables.read_table(os.path.join(same, "unbalanced.parquet")).equals(t)
    other = make_run(str(tmp_path / "c"))
    run_balance(other, BalanceConfig(**{**CFG.__dict__, "seed": 4}), scale=ScaleConfig(mode="local"))
    o = tables.read_table(os.path.join(other, "unbalanced.parquet"))
    reps = o.column("repeats").to_numpy().astype(np.int64)
    assert not np.array_equal(reps, new) and _leaf_sums(o, reps) == _leaf_sums(t, new)


def test_mapping_gaps_are_collected_over_all_shards(tmp_path):
    run = make_run(str(tmp_path / "m"))
    mapping = tmp_path / "map.csv"
    mapping.write_text("cluster,group,weight\n1,cells,1\n")
    with pytest.raises(BalanceError, match="no row for clusters \\[0, 2\\]"):
        run_balance(run, BalanceConfig(mapping_file=str(mapping)), scale=ScaleConfig(mode="local", shard_rows=300))
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("cluster,group,weight\n0,cells,1\n1,cells,2\n2,x,1\n")
    with pytest.raises(BalanceError, match="group 'cells' has weight 2.0 here and 1.0"):
        run_balance(run, BalanceConfig(mapping_file=str(mixed)), scale=ScaleConfig(mode="local"))


def test_directory_manifest_reads_through_the_training_stream(tmp_path):
    from cytoray.curation.pipeline import publish_manifest
    from cytoray.manifest import read_manifest
    from cytoray.platform.data.stream import expand_repeats
    from cytoray.platform.data.stream import read_manifest as read_training_manifest

    run = make_run(str(tmp_path / "d"))
    balanced = tables.read_table(os.path.join(run, "deduplicated.parquet")).slice(0, 900)
    balanced = balanced.append_column("repeats", pa.array(np.arange(900) % 3 + 1, pa.int32()))
    _write(os.path.join(run, "balanced.parquet"), balanced, parts=3)
    assert publish_manifest(run, "balanced.parquet", None) == 900
    uri = os.path.join(run, "manifest.parquet")
    assert sorted(os.listdir(uri)) == [f"part-{i:05d}.parquet" for i in range(3)]
    got = read_training_manifest(uri, None)
    assert got.column("image_id").to_pylist() == balanced.column("image_id").to_pylist()
    assert len(expand_repeats(got)) == int(np.sum(np.arange(900) % 3 + 1))
    assert read_manifest(uri, columns=("image_id", "uri")).num_rows == 900


def make_lab_run(out: str, datasets: list[tuple[str, int, dict]]) -> str:
    """A small run directory (as :func:`make_run`) from (dataset, images, {cell type: images}) — one top cluster
    per dataset, two finer clusters each."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(out, "_stages"), exist_ok=True)
    ds, cells = [], []
    for name, n, types in datasets:
        ds += [name] * n
        cells += [c for c, k in types.items() for _ in range(k)] + [None] * (n - sum(types.values()))
    ids = [f"{d}/img{i:04d}.png" for i, d in enumerate(ds)]
    table = pa.table({"image_id": ids, "uri": [f"/x/{i}" for i in ids], "dataset": ds,
                      "modality": ["peripheral_blood"] * len(ids), "cell_type": pa.array(cells, pa.string()),
                      "patient_label": pa.array([None] * len(ids), pa.string())})
    _write(os.path.join(out, "embeddings.parquet"), pa.table({"image_id": ids, "embedding": tables.pack_vectors(
        rng.normal(size=(len(ids), 8)).astype(np.float32))}), None)
    shards.publish_mask(StageRun("dedup", out), shards.KEPT_MASK, np.ones(len(ids), bool))
    top = np.unique(ds, return_inverse=True)[1]
    _write(os.path.join(out, "deduplicated.parquet"), table, None)
    _write(os.path.join(out, "clusters.parquet"), pa.table({
        "image_id": ids, "cluster_l1": pa.array(top * 2 + np.arange(len(ids)) % 2, pa.int32()),
        "cluster_l2": pa.array(top, pa.int32())}), None)
    with open(os.path.join(out, "_stages", "cluster.json"), "w") as fh:
        json.dump({"lineage": "synthetic"}, fh)
    return out


# issue 31: a hospital's 300 labelled cells in 5 even classes beside a lab's 100 eosinophils. Grouping by dataset
# brings the lab to half the samples, so eosinophils go from 0.33 to about 0.6 of the labelled cells.
HOSPITAL = ("hospital", 300, {t: 60 for t in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "blast")})
LAB = ("lab", 100, {"eosinophil": 100})


def test_balance_reports_largest_shares_and_warns_when_cell_types_get_less_balanced(tmp_path):
    from cytoray.curation.pipeline import stage_line

    quiet = ScaleConfig(mode="local")
    by_dataset = run_balance(make_lab_run(str(tmp_path / "d"), [HOSPITAL, LAB]), BalanceConfig(mixing_sample=200),
                             scale=quiet)
    shares = by_dataset["largest_share"]
    assert list(shares) == ["dataset", "cell_type"]  # the grouping first
    assert shares["dataset"] == {"before": 0.75, "after": 0.5}
    assert shares["cell_type"]["before"] == 0.4 and shares["cell_type"]["after"] > 0.55  # 120 of 300 -> ~0.6
    [warning] = by_dataset["warnings"]
    assert "\n" not in warning and "balance.group_by=dataset made cell types less balanced" in warning
    assert f"{shares['cell_type']['before']:.2f} -> {shares['cell_type']['after']:.2f}" in warning
    assert "balance.group_by=cell_type" in warning.split(";")[1]
    line = stage_line("balance", by_dataset)
    assert (f"largest share before -> after: dataset (grouping) 0.75 -> 0.50, cell type 0.40 -> "
            f"{shares['cell_type']['after']:.2f}; kNN dataset mixing ") in line

    # grouping by cell type: the cell-type share falls and nothing is said
    by_type = run_balance(make_lab_run(str(tmp_path / "t"), [HOSPITAL, LAB]),
                          BalanceConfig(group_by="cell_type", mixing_sample=200), scale=quiet)
    assert by_type["largest_share"]["cell_type"]["after"] < 0.4 and by_type["warnings"] == []
    assert "cell type (grouping) 0.40 -> " in stage_line("balance", by_type)


def test_one_dataset_mixing_is_not_applicable_and_balance_off_counts_its_manifest(tmp_path):
    """One dataset: the mixing score is "n/a (one dataset)" (it was NaN: `nan -> nan` on the console, NaN in
    summary.json). balance.enabled=false: every kept image once, and the counts say so (it printed and wrote a
    subsample's count while the manifest held every image)."""
    from cytoray.curation.pipeline import publish_manifest, stage_line

    run = make_lab_run(str(tmp_path / "one"), [HOSPITAL])
    off = run_balance(run, BalanceConfig(enabled=False, target_size=50, mixing_sample=200),
                      scale=ScaleConfig(mode="local"))
    assert off["before"]["knn_dataset_mixing"] == off["after"]["knn_dataset_mixing"] == "n/a (one dataset)"
    assert json.loads(json.dumps(off)) == off  # plain JSON, no NaN
    assert off["sampled_images"] == off["samples_per_epoch"] == off["target_size"] == 300
    assert publish_manifest(run, "balanced.parquet", None) == 300
    assert set(tables.read_table(os.path.join(run, "manifest.parquet")).column("repeats").to_pylist()) == {1}
    assert off["warnings"] == [] and off["largest_share"]["cell_type"] == {"before": 0.2, "after": 0.2}
    assert stage_line("balance", off) == ("balance: off (balance.enabled=false); 300 kept -> 300 sampled images, "
                                          "each once: 300 samples/epoch")
    on = run_balance(run, BalanceConfig(mixing_sample=200), scale=ScaleConfig(mode="local"))
    assert stage_line("balance", on).endswith("kNN dataset mixing n/a (one dataset) -> n/a (one dataset)")
