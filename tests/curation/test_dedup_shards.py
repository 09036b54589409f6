"""The dedup stage over shards: Ray tasks and this process give the same duplicates, and both equal the in-memory
search (``dedup.deduplicate`` / ``remove_leakage_and_duplicates``); the partitioned (list) branch, several
index partitions, multi-file inputs and outputs, and the leakage guard all take part."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from cytoray.curation.dedup import DedupConfig, deduplicate, remove_leakage_and_duplicates
from cytoray.curation.dedup_stage import query_groups, run_dedup
from cytoray.curation.shards import ScaleConfig, layout, load_mask
from cytoray.tables import read_table


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """1,200 synthetic images with planted copies and look-alikes, plus 4 evaluation cells saved as PNG whose exact
    copies are among the training rows: (ingested, embeddings, eval manifest uri, leaked image ids)."""
    from PIL import Image

    from cytoray.curation.synthetic.cells import Stain, render_cell
    from cytoray.curation.synthetic.planted import make_collection
    from cytoray.features.fingerprint import fingerprint_columns
    from cytoray.tables import pack_vectors, write_table

    ingested, embeddings, _ = make_collection(1200, 8, 0.1, seed=3)
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(11)
    cells = [render_cell(c, 96, 0.2, Stain(), rng) for c in ("blast", "monocyte", "eosinophil", "lymphocyte")]
    uris = []
    for k, im in enumerate(cells):
        Image.fromarray(im).save(root / f"e{k}.png")
        uris.append(str(root / f"e{k}.png"))
    write_table(str(root / "eval.parquet"), pa.table({"uri": uris}))
    leaked = [f"ds00/leak{k}" for k in range(len(cells))]
    extra_ing = pa.table({f.name: pa.array([leaked[k] if f.name == "image_id" else f"leakpx{k}"
                                            if f.name == "pixel_sha256" else "ds00" if f.name == "dataset"
                                            else 96 if f.name in ("width", "height") else None
                                            for k in range(len(cells))], f.type)
                          for f in ingested.schema}, schema=ingested.schema)
    extra_emb = pa.table({"image_id": pa.array(leaked), "embedding": pack_vectors(
        np.ones((len(cells), 8), np.float32) / np.sqrt(8)), **fingerprint_columns(cells)})
    ingested = pa.concat_tables([ingested, extra_ing]).sort_by("image_id")
    embeddings = pa.concat_tables([embeddings, extra_emb.cast(embeddings.schema)]).sort_by("image_id")
    return ingested, embeddings, str(root / "eval.parquet"), leaked


def _run(tmp_path, name, planted, cfg, scale, parts=0):
    from cytoray.curation.synthetic.planted import write_run

    out = str(tmp_path / name)
    write_run(out, planted[0], planted[1], {"test": name}, parts=parts)
    summary = run_dedup(out, cfg, scale=scale)
    dups = read_table(f"{out}/duplicates.parquet").to_pandas().sort_values("image_id").reset_index(drop=True)
    kept = read_table(f"{out}/deduplicated.parquet").column("image_id").to_pylist()
    return out, summary, dups, kept


def test_ray_tasks_and_this_process_find_the_same_duplicates(planted, ray_local, tmp_path):
    # lists (flat_max below N), 3 index partitions, 4 query shards (searched 2 per task by the Ray tasks), the
    # leakage guard both ways
    cfg = DedupConfig(flat_max=300, partition_rows=500, eval_manifests=[planted[2]])
    _, local, d_local, k_local = _run(tmp_path, "local", planted, cfg, ScaleConfig(mode="local", shard_rows=350))
    out, ray_, d_ray, k_ray = _run(tmp_path, "ray", planted, replace(cfg, search_rows=700),
                                   ScaleConfig(mode="ray", shard_rows=350, max_in_flight=2), parts=3)
    # every search task reads the index partitions its queries probe: 4 tasks read more of it than 2 do
    read_local, read_ray = (x["search"].pop("index_bytes_read") for x in (local, ray_))
    assert 0 < read_ray < read_local
    assert local["search"].pop("index_bytes_read_per_image") == round(read_local / local["total"]["images"], 1)
    ray_["search"].pop("index_bytes_read_per_image")
    assert local["search"] == {"lists": 4, "routing": "variant", "shards": 4, "search_tasks": 4, "ray_tasks": False}
    assert ray_["search"] == {"lists": 4, "routing": "variant", "shards": 4, "search_tasks": 2, "ray_tasks": True}
    assert len(layout(f"{out}/deduplicated.parquet").files) == 4  # one part per shard, written by the tasks
    assert k_local == k_ray and local["total"] == ray_["total"]
    assert d_local[["image_id", "duplicate_of", "reason"]].equals(d_ray[["image_id", "duplicate_of", "reason"]])
    np.testing.assert_allclose(d_local.similarity, d_ray.similarity, atol=1e-6)
    leaks = d_ray[d_ray.reason == "leakage"]
    assert sorted(leaks.image_id) == sorted(planted[3]) and (leaks.similarity > 0.999).all()
    assert set(leaks["transform"]) == {"same frame"}
    assert local["total"]["near"] > 50 and local["total"]["exact"] > 5
    mask = load_mask(out)
    ids = planted[0].column("image_id").to_pylist()
    assert mask.sum() == len(k_ray) and [i for i, m in zip(ids, mask) if m] == k_ray


def test_sharded_stage_equals_the_in_memory_search(planted, ray_local, tmp_path):
    from cytoray.features.fingerprint import fingerprints_of_table

    frame = planted[0].select(["image_id", "pixel_sha256", "cell_type", "width", "height", "dataset"]).to_pandas()
    prints = fingerprints_of_table(planted[1])
    for cfg in (DedupConfig(flat_max=300), DedupConfig()):  # partitioned and exact search
        keep, dups, _ = deduplicate(frame, cfg, prints=prints)
        _, summary, d_stage, kept = _run(tmp_path, f"flat{cfg.flat_max}", planted, cfg,
                                         ScaleConfig(mode="local", shard_rows=500))
        ref = sorted((d["image_id"], d["duplicate_of"], d["reason"], d["transform"]) for d in dups)
        assert ref == list(zip(d_stage.image_id, d_stage.duplicate_of, d_stage.reason, d_stage["transform"])), cfg
        assert kept == frame.image_id[keep].tolist()
        v = summary["verification"]["near"]
        assert v["candidates"] == v["verified"] + v["kept_apart"] + v["no_alignment"] + v["unverifiable"]
        assert sum(v["histogram_verified"]) == v["verified"] and v["verified"] >= summary["total"]["near"]
    # with the leakage guard (exact search): the same leaks and duplicates as the in-memory stage rules
    cfg = DedupConfig(eval_manifests=[planted[2]])
    from cytoray.curation.dedup import read_eval_manifest
    from cytoray.curation.embed import EmbedConfig, embed_rows

    rows = read_eval_manifest(planted[2])
    eval_fp = fingerprints_of_table(embed_rows(rows, EmbedConfig()))
    keep, dups, _ = remove_leakage_and_duplicates(frame, prints, [(f"eval:{planted[2]}",
                                                                   rows.column("image_id").to_pylist(), eval_fp)], cfg)
    _, _, d_stage, kept = _run(tmp_path, "leak", planted, cfg, ScaleConfig(mode="local", shard_rows=500))
    ref = sorted((d["image_id"], d["duplicate_of"], d["reason"]) for d in dups)
    assert ref == list(zip(d_stage.image_id, d_stage.duplicate_of, d_stage.reason))
    assert kept == frame.image_id[keep].tolist()


def test_query_groups_take_whole_shards_and_leave_tasks_for_every_slot():
    shards = [("shard", i, a, min(1000, a + 100)) for i, a in enumerate(range(0, 1000, 100))]  # 10 shards
    scale = ScaleConfig(shard_rows=100, max_in_flight=3)
    assert query_groups(shards, 400, scale) == [("shard", 0, 0, 400), ("shard", 1, 400, 800),
                                                ("shard", 2, 800, 1000)]  # 4 shards per task, 3 tasks
    assert query_groups(shards, 400, ScaleConfig(shard_rows=100, max_in_flight=8)) == [
        ("shard", g, 200 * g, 200 * g + 200) for g in range(5)]  # 2 per task: 8 slots want >= 8 tasks
    assert query_groups(shards, 50, scale) == shards  # never less than a shard
    with pytest.raises(ValueError, match="search_rows"):
        query_groups(shards, 0, scale)
