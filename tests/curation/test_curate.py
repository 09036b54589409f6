"""The curation run end to end (ingest -> embed -> dedup -> manifest) on the synthetic collection."""

import json
import os

import pyarrow.parquet as pq

from cytoray.curation.pipeline import CurateConfig, run_curation
from cytoray.curation.synthetic.scoring import dedup_precision_recall
from cytoray.runtime import RayConfig


def _run(collection, out, **kw):
    from cytoray.curation.ingest import DatasetSpec

    specs = [DatasetSpec(**d) for d in collection["datasets"]]
    return run_curation(CurateConfig(output_uri=str(out), datasets=specs, ray=RayConfig(num_cpus=2), **kw))


def test_curation_outputs_reconcile_and_find_planted_duplicates(ray_local, collection, ground_truth, tmp_path):
    out = tmp_path / "run"
    res = _run(collection, out)
    for name in ("manifest.parquet", "duplicates.parquet", "quarantine.parquet", "summary.json",
                 "ingested.parquet", "embeddings.parquet", "config.yaml"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    t = summary["total"]
    manifest = pq.read_table(out / "manifest.parquet").to_pandas()
    dups = pq.read_table(out / "duplicates.parquet").to_pandas()
    quarantine = pq.read_table(out / "quarantine.parquet").to_pandas()
    # inputs = kept + duplicates + quarantined (files for quarantine, images for the rest)
    assert t["input_files"] == t["kept_files"] + t["quarantined_files"] == t["kept_files"] + len(quarantine)
    assert t["images"] == t["kept"] + t["duplicates"] == len(manifest) + len(dups)
    assert not set(manifest.image_id) & set(dups.image_id)
    assert set(dups.duplicate_of) <= set(manifest.image_id)  # every removed image points at a kept one
    # the planted duplicates of the ground truth (ids mapped from <dataset>/<relpath>)
    gt = ground_truth.copy()
    gt_key = {f"{r.dataset}/{r.relpath}": r.image_id for r in gt.itertuples()}
    mapped = [{"image_id": gt_key.get(r.image_id, r.image_id), "duplicate_of": gt_key.get(r.duplicate_of, r.duplicate_of)}
              for r in dups.itertuples()]
    scores = dedup_precision_recall(mapped, gt)
    print(scores, summary["total"])
    assert scores["planted"] >= 8 and scores["recall"] >= 0.9 and scores["precision"] >= 0.95, scores
    assert t["cross_dataset_duplicates"] >= 1
    emb = pq.read_table(out / "embeddings.parquet")
    assert emb.num_rows == t["images"] and emb.column("embedding").type.value_type == "float"
    assert res["embed"]["embedder"] == "handcrafted" and "standardise" in res["embed"]


def test_rerun_with_the_same_seed_gives_the_same_manifest(ray_local, collection, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(collection, a)
    _run(collection, b)
    ma, mb = pq.read_table(a / "manifest.parquet"), pq.read_table(b / "manifest.parquet")
    # crops live under each run's own directory; everything else is identical
    assert [u.replace(str(a), "") for u in ma.column("uri").to_pylist()] == \
        [u.replace(str(b), "") for u in mb.column("uri").to_pylist()]
    assert ma.drop_columns(["uri"]).equals(mb.drop_columns(["uri"]))
    assert pq.read_table(a / "duplicates.parquet").equals(pq.read_table(b / "duplicates.parquet"))
    mtime = os.path.getmtime(a / "manifest.parquet")
    again = _run(collection, a)  # every stage marker present: nothing recomputed
    assert again["dedup"]["total"] == json.loads((a / "_stages" / "dedup.json").read_text())["total"]
    assert os.path.getmtime(a / "embeddings.parquet") < mtime
