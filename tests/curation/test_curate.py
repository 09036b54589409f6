"""The curation run end to end (ingest -> embed -> dedup + leakage guard -> cluster -> balance -> manifest,
summary, report) on the synthetic collection."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from cytoray.curation.pipeline import CurateConfig, run_curation
from cytoray.curation.synthetic.scoring import dedup_precision_recall
from cytoray.runtime import RayConfig
from cytoray.testing import rendered_dom


def _run(collection, out, **kw):
    from cytoray.curation.ingest import DatasetSpec

    specs = [DatasetSpec(**d) for d in collection["datasets"]]
    return run_curation(CurateConfig(output_uri=str(out), datasets=specs, ray=RayConfig(num_cpus=2), **kw))


def _leak_sources(collection, ground_truth, n=5):
    """Originals of single-cell datasets without planted duplicates (they are kept by dedup for sure)."""
    gt = ground_truth
    dup_of = set(gt.duplicate_of.dropna())
    pick = gt[(gt.kind == "original") & gt.dataset.isin(["acevedo", "bmc", "matek"]) & ~gt.image_id.isin(dup_of)]
    pick = pick.sort_values("image_id").iloc[:: max(1, len(pick) // n)].head(n)
    return pick.image_id.tolist(), [os.path.join(collection["root"], d, r) for d, r in zip(pick.dataset, pick.relpath)]


def test_curation_outputs_reconcile_and_find_planted_duplicates(ray_local, collection, ground_truth, tmp_path):
    from cytoray.curation.dedup import DedupConfig
    from cytoray.testing import write_eval_manifest

    leaked_ids, leaked_paths = _leak_sources(collection, ground_truth)
    eval_manifest = write_eval_manifest(str(tmp_path / "eval"), leaked_paths, fresh=40)
    out = tmp_path / "run"
    res = _run(collection, out, dedup=DedupConfig(eval_manifests=[eval_manifest]))
    for name in ("manifest.parquet", "duplicates.parquet", "quarantine.parquet", "summary.json", "report.html",
                 "unbalanced.parquet", "group_mapping_template.csv", "ingested.parquet", "embeddings.parquet",
                 "clusters.parquet", "config.yaml"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    t = summary["total"]
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    unbalanced = pq.read_table(out / "unbalanced.parquet").to_pandas()
    dups = pq.read_table(out / "duplicates.parquet").to_pandas()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas()
    # inputs = kept + duplicates + quarantined (files for quarantine, images for the rest)
    assert t["input_files"] == t["kept_files"] + t["quarantined_files"] == t["kept_files"] + len(quarantine)
    assert t["images"] == t["kept"] + t["duplicates"] == len(unbalanced) + len(dups)
    assert not set(unbalanced.image_id) & set(dups.image_id)
    near = dups[dups.reason != "leakage"]
    assert set(near.duplicate_of) <= set(unbalanced.image_id)  # every removed image points at a kept one

    # leakage guard: every planted leak dropped, pointing at its evaluation copy; few false alarms
    leaks = dups[dups.reason == "leakage"]
    assert set(leaked_ids) <= set(leaks.image_id), (leaked_ids, leaks)
    for i, lid in enumerate(leaked_ids):
        assert leaks.set_index("image_id").loc[lid, "duplicate_of"] == f"leak_{i:03d}"
    assert set(leaks.image_id) == set(leaked_ids), leaks  # copies only: no look-alike flagged as leakage
    assert t["leakage"] == len(leaks) and summary["eval_manifests"] == [eval_manifest]
    # every candidate pair accounted for; the records say which transform (the leaks are mirrored)
    v = summary["dedup_verification"]
    for kind in ("near", "leakage"):
        assert v[kind]["candidates"] == sum(v[kind][c] for c in ("verified", "kept_apart", "no_alignment",
                                                                 "unverifiable"))
    assert v["leakage"]["verified"] >= len(leaks) and set(leaks["transform"]) == {"flip horizontal"}
    assert near["transform"].notna().all() and (near.similarity >= summary["dedup_threshold"]).all()

    # clustering and balancing: ids per level, a tree; balanced manifest = rows with repeats >= 1
    cols = summary["clusters"]["columns"]
    assert cols == [f"cluster_l{i + 1}" for i in range(len(cols))] and len(cols) >= 2
    assert set(cols) <= set(manifest.columns) and {"group", "weight", "repeats"} <= set(manifest.columns)
    assert (manifest.repeats >= 1).all() and set(manifest.image_id) <= set(unbalanced.image_id)
    assert len(manifest) == t["sampled_images"] == (unbalanced.repeats > 0).sum()
    assert manifest.repeats.sum() == t["samples_per_epoch"] == summary["balance"]["target_size"] == t["kept"]
    assert manifest.repeats.max() <= summary["balance"]["max_repeat"]
    b = summary["balance"]
    assert b["after"]["largest_dataset_share"] < 0.75 * b["before"]["largest_dataset_share"], b
    assert b["after"]["dataset"]["normalized_entropy"] > b["before"]["dataset"]["normalized_entropy"]
    for key in ("dataset", "group", "cell_type", "cluster"):
        assert {"entropy", "normalized_entropy", "kl_to_uniform"} <= set(b["after"][key])
    assert np.isfinite(b["before"]["knn_dataset_mixing"]) and np.isfinite(b["after"]["knn_dataset_mixing"])
    template = (out / "group_mapping_template.csv").read_text().splitlines()
    assert template[0].startswith("cluster,group,weight") and len(template) - 1 == unbalanced[cols[-1]].nunique()
    # the planted duplicates of the ground truth (ids mapped from <dataset>/<relpath>)
    gt = ground_truth.copy()
    gt_key = {f"{r.dataset}/{r.relpath}": r.image_id for r in gt.itertuples()}
    mapped = [{"image_id": gt_key.get(r.image_id, r.image_id), "duplicate_of": gt_key.get(r.duplicate_of, r.duplicate_of)}
              for r in near.itertuples()]  # the leakage rows are scored above
    scores = dedup_precision_recall(mapped, gt)
    print(scores, summary["total"])
    assert scores["planted"] >= 8 and scores["recall"] >= 0.9 and scores["precision"] >= 0.95, scores
    assert t["cross_dataset_duplicates"] >= 1
    emb = pq.read_table(out / "embeddings.parquet")
    assert emb.num_rows == t["images"] and emb.column("embedding").type.value_type == "float"
    assert res["embed"]["embedder"] == "handcrafted" and "standardise" in res["embed"]
    _check_report_renders(out / "report.html", n_clusters=unbalanced[cols[-1]].nunique())


def _check_report_renders(path, n_clusters):
    """Open report.html in a real headless Chromium and check the sections and every image rendered."""
    html = path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    dom = rendered_dom(str(path))
    for section in ("counts", "balance", "clusters", "duplicates", "quarantine", "map"):
        assert f'<section id="{section}">' in dom, section
    import re

    m = re.search(r'data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert m, "the page's load script did not run"
    loaded, total = int(m.group(1)), int(m.group(2))
    # 4 balance charts + 2 maps + the verified-score histograms + a montage per cluster + duplicate pairs: all
    # decoded by the browser
    assert loaded == total >= 7 + n_clusters, (loaded, total)
    assert "verified (removed)" in dom and "lowest-scoring removals" in dom
    assert dom.count("class=\"montage\"") == n_clusters


def test_rerun_with_the_same_seed_gives_the_same_manifest(ray_local, collection, tmp_path):
    from cytoray.curation.shards import ScaleConfig

    a, b = tmp_path / "a", tmp_path / "b"
    _run(collection, a)
    # b: dedup, cluster and balance as Ray tasks over 3 shards, outputs as directories of parts: the same run
    res_b = _run(collection, b, scale=ScaleConfig(mode="ray", shard_rows=120))
    assert res_b["dedup"]["search"]["ray_tasks"] and (b / "manifest.parquet").is_dir()
    ma, mb = pq.read_table(a / "manifest.parquet"), pq.read_table(b / "manifest.parquet")
    # crops live under each run's own directory; everything else is identical
    assert [u.replace(str(a), "") for u in ma.column("uri").to_pylist()] == \
        [u.replace(str(b), "") for u in mb.column("uri").to_pylist()]
    assert ma.drop_columns(["uri"]).equals(mb.drop_columns(["uri"]))
    assert pq.read_table(a / "duplicates.parquet").equals(pq.read_table(b / "duplicates.parquet"))
    # and back: dedup forced in this process over b's directory of parts writes one file with a's rows
    from cytoray.curation.dedup import DedupConfig
    from cytoray.curation.dedup_stage import run_dedup

    run_dedup(str(b), DedupConfig(), force=True, scale=ScaleConfig(mode="local"))
    assert (b / "deduplicated.parquet").is_file()
    assert pq.read_table(b / "deduplicated.parquet").drop_columns(["uri"]).equals(
        pq.read_table(a / "deduplicated.parquet").drop_columns(["uri"]))
    mtime = os.path.getmtime(a / "manifest.parquet")
    again = _run(collection, a)  # every stage marker present: nothing recomputed
    assert again["dedup"]["total"] == json.loads((a / "_stages" / "dedup.json").read_text())["total"]
    assert os.path.getmtime(a / "embeddings.parquet") < mtime
    # a changed balance setting reruns balancing (and only what follows it), not the earlier stages
    from cytoray.curation.balance import BalanceConfig

    emb_mtime, cl_mtime = os.path.getmtime(a / "embeddings.parquet"), os.path.getmtime(a / "clusters.parquet")
    changed = _run(collection, a, balance=BalanceConfig(max_repeat=1))
    assert changed["balance"]["max_repeat"] == 1 and pq.read_table(a / "manifest.parquet").column("repeats").to_numpy().max() == 1
    assert os.path.getmtime(a / "embeddings.parquet") == emb_mtime and os.path.getmtime(a / "clusters.parquet") == cl_mtime
    # A stage called directly (not through the pipeline) with a changed setting reruns too, and the next stage
    # sees that its input changed: stage markers record a lineage of settings, not just "done".
    from cytoray.curation.balance_passes import run_balance
    from cytoray.curation.cluster import ClusterConfig, run_cluster

    before = json.loads((a / "_stages" / "cluster.json").read_text())
    reclustered = run_cluster(str(a), ClusterConfig(levels=[3]))
    assert reclustered["levels"] == [3] and reclustered["lineage"] != before["lineage"]
    assert pq.read_table(a / "clusters.parquet").column_names == ["image_id", "cluster_l1"]
    assert run_cluster(str(a), ClusterConfig(levels=[3]))["seconds"] == reclustered["seconds"]  # now current
    rebalanced = run_balance(str(a), BalanceConfig(max_repeat=1))  # same balance settings as the last run
    assert rebalanced["top_cluster_column"] == "cluster_l1"
    assert set(pq.read_table(a / "unbalanced.parquet").column("cluster_l1").to_numpy()) <= {0, 1, 2}


def test_stages_run_in_order_and_a_failed_stage_leaves_no_marker(tmp_path):
    from cytoray.curation import stage

    with pytest.raises(stage.StageOrderError, match="cluster reads the output of dedup.*recipes/curate.py"):
        stage.run_stage("cluster", str(tmp_path), {}, lambda run: {})
    (tmp_path / "_stages").mkdir()
    (tmp_path / "_stages" / "dedup.json").write_text(json.dumps({"lineage": "x"}))
    staged = []

    def fails(run):
        staged.append(run.staging)
        run.publish_bytes("partial.txt", b"half")
        os.makedirs(run.staging)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        stage.run_stage("cluster", str(tmp_path), {"levels": [2]}, fails)
    assert not (tmp_path / "_stages" / "cluster.json").exists() and not os.path.exists(staged[0])
    done = stage.run_stage("cluster", str(tmp_path), {"levels": [2]}, lambda run: {"n": 1})
    assert done["n"] == 1 and done["settings"] == {"levels": [2]}
    assert stage.run_stage("cluster", str(tmp_path), {"levels": [2]}, fails)["n"] == 1  # current: body not run
    (tmp_path / "_stages" / "dedup.json").write_text(json.dumps({"lineage": "y"}))  # an earlier stage reran
    with pytest.raises(RuntimeError, match="boom"):
        stage.run_stage("cluster", str(tmp_path), {"levels": [2]}, fails)
    with pytest.raises(AssertionError, match="reserved summary keys \\['seconds'\\]"):
        stage.run_stage("cluster", str(tmp_path), {}, lambda run: {"seconds": 1})


def test_a_stage_written_in_an_older_output_format_reruns(tmp_path, monkeypatch):
    """A run directory from older code (its embed outputs lack columns today's dedup reads) is rerun from the stage
    whose format changed, not reported as up to date."""
    from cytoray.curation import stage

    (tmp_path / "_stages").mkdir()
    (tmp_path / "_stages" / "ingest.json").write_text(json.dumps({"lineage": "x"}))
    assert stage.run_stage("embed", str(tmp_path), {"k": 1}, lambda run: {"n": 1})["n"] == 1
    assert stage.run_stage("embed", str(tmp_path), {"k": 1}, lambda run: {"n": 2})["n"] == 1  # current
    monkeypatch.setitem(stage.FORMATS, "embed", "a later format")
    assert stage.run_stage("embed", str(tmp_path), {"k": 1}, lambda run: {"n": 3})["n"] == 3  # rerun
