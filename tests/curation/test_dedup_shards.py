"""The dedup stage over shards: Ray tasks and this process give the same duplicates, and both equal the in-memory
search (``dedup.deduplicate`` / ``remove_leakage_and_duplicates``); the partitioned (list) branch, several
index partitions, multi-file inputs and outputs, and the leakage guard all take part."""


import numpy as np
import pyarrow as pa
import pytest

from cytoray.curation.dedup import DedupConfig, deduplicate, remove_leakage_and_duplicates
from cytoray.curation.dedup_stage import run_dedup
from cytoray.curation.shards import ScaleConfig, balanced_groups, layout, load_mask
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
    # verification groups of at most 300 pairs: cut differently in this process (1 task at a time) and as Ray tasks
    cfg = DedupConfig(flat_max=300, partition_rows=500, eval_manifests=[planted[2]], verify_pairs=300)
    _, local, d_local, k_local = _run(tmp_path, "local", planted, cfg, ScaleConfig(mode="local", shard_rows=350))
    out, ray_, d_ray, k_ray = _run(tmp_path, "ray", planted, cfg,
                                   ScaleConfig(mode="ray", shard_rows=350, max_in_flight=2), parts=3)
    # the join reads each index partition once per pass and each routed query once, however many tasks run
    sl, sr = local["search"], ray_["search"]
    assert sl["bytes_read"] == sr["bytes_read"] and sl["bytes_written"] == sr["bytes_written"]
    assert sl["bytes_read"]["index"] == sl["bytes_written"]["index"] > 0
    assert 0 < sl["bytes_read"]["queries"] <= sl["bytes_written"]["queries"]  # a partition without index: not read
    assert sl["bytes_read"]["candidates"] == sl["bytes_written"]["candidates"] > 0
    assert sl["bytes_read_per_image"] == round(sl["bytes_read_total"] / local["total"]["images"], 1)
    assert 1 <= sl["routed_per_image_view"] <= 8 * 3  # the partitions of its 8 variants' 3 probed lists
    for s, ray_tasks in ((sl, False), (sr, True)):
        assert {k: s[k] for k in ("lists", "routing", "shards", "ray_tasks")} == {
            "lists": 4, "routing": "variant", "shards": 4, "ray_tasks": ray_tasks}
        # at most ceil(1,204 / 500) per view (fewer when grouping the lists leaves one empty); one task each
        assert all(2 <= p <= 3 for p in s["partitions"]) and s["compare_tasks"] == sum(s["partitions"])
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


def test_sharded_stage_equals_the_in_memory_search(planted, ray_local, tmp_path, monkeypatch):
    from cytoray.curation import dedup as D
    from cytoray.features.fingerprint import fingerprints_of_table

    frame = planted[0].select(["image_id", "pixel_sha256", "cell_type", "width", "height", "dataset"]).to_pandas()
    prints = fingerprints_of_table(planted[1])
    # partitioned search (its 4 lists; then routing=closed, its lists closed under the flips/rotations as above
    # CLOSED_MIN_LISTS: 8 lists, one routing search), and exact search
    for cfg, closed_from in ((DedupConfig(flat_max=300), 128), (DedupConfig(flat_max=300, routing="closed"), 1),
                             (DedupConfig(), 128)):
        monkeypatch.setattr(D, "CLOSED_MIN_LISTS", closed_from)
        keep, dups, _ = deduplicate(frame, cfg, prints=prints)
        _, summary, d_stage, kept = _run(tmp_path, f"flat{cfg.flat_max}-{closed_from}", planted, cfg,
                                         ScaleConfig(mode="local", shard_rows=500))
        assert summary["search"]["lists"] == {300: 8 if closed_from == 1 else 4, 5000: 1}[cfg.flat_max]
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


def test_list_partitions_keep_an_images_probes_together(planted):
    """The join sends an image's row to every partition its 8 flips/rotations probe: the partitions chosen from the
    lists' flip/rotation-summed centroids and their co-probe graph touch fewer per image than ranges of list ids,
    and stay within their size bound."""
    from cytoray.curation import dedup as D
    from cytoray.curation.dedup_stage import partition_lists
    from cytoray.features.fingerprint import fingerprints_of_table

    views = fingerprints_of_table(planted[1])["views"]
    for v in range(views.shape[1]):
        prints = D.Prints(np.ascontiguousarray(views[:, v:v + 1]))
        rows = D.route_rows(prints.exact(np.arange(len(prints)), 0), 2)
        lists = D._kmeans_lists(rows, 60)
        probes = D._probe_lists(lists, prints, 3, 2).reshape(len(prints), -1)
        home = lists.search(rows, 1)[1][:, 0]

        def touched(part, probes=probes):
            p = np.sort(part[probes], axis=1)
            return 1 + (np.diff(p, axis=1) != 0).sum(axis=1).mean()

        part = partition_lists(lists, rows, 6, 3)
        assert part.shape == (60,) and 3 <= part.max() <= 5 and len(np.unique(part)) == part.max() + 1
        assert np.bincount(part[home], minlength=6).max() <= 1.6 * len(prints) / 6
        assert touched(part) < 0.75 * touched(np.arange(60) * 6 // 60), v
        assert (partition_lists(lists, rows, 1, 3) == 0).all()


def test_verification_groups_fill_every_task_slot():
    """Pairs are cut into contiguous groups of at most dedup.verify_pairs, as many as a multiple of the tasks that
    run at once (no last wave that leaves CPUs idle), of equal size, and never smaller than ``least`` to get there."""
    g = balanced_groups(162_000, 32_768, 4)  # 5 groups of at most 32,768 -> 8 of 20,250
    assert np.array_equal(np.bincount(g), [20_250] * 8) and (np.diff(g) >= 0).all()
    assert np.bincount(balanced_groups(1_670_000, 32_768, 4)).max() <= 32_768
    assert len(np.unique(balanced_groups(1_670_000, 32_768, 4))) == 52  # 51 -> 52 = 13 waves of 4
    assert len(np.unique(balanced_groups(600, 32_768, 4))) == 2  # not 4 groups of 150: at least 256 each
    assert len(np.unique(balanced_groups(600, 32_768, 1))) == 1 and len(balanced_groups(0, 10, 4)) == 0
    with pytest.raises(ValueError, match="group size 0"):
        balanced_groups(10, 0, 4)
