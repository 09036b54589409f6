"""Ingest over a real local Ray instance on the synthetic collection (all layouts, planted bad files)."""

import json
import os

import pyarrow.parquet as pq
import pytest

from cytoray.curation.ingest import CropConfig, DatasetSpec, IngestConfig, run_ingest, validate_specs


def specs_of(collection, names=None):
    return [DatasetSpec(**d) for d in collection["datasets"] if names is None or d["name"] in names]


@pytest.fixture(scope="module")
def ingested(ray_local, collection, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ingest"))
    summary = run_ingest(specs_of(collection), out, IngestConfig(crop=CropConfig(margin=0.1, size=64)))
    return out, summary


def test_every_input_is_kept_or_quarantined(ingested, ground_truth):
    out, summary = ingested
    manifest = pq.read_table(f"{out}/ingested.parquet").to_pandas()
    quarantine = pq.read_table(f"{out}/quarantine.parquet").to_pandas()
    for name, d in summary["datasets"].items():
        assert d["input_files"] == d["kept_files"] + d["quarantined_files"], name
    gt_files = ground_truth[ground_truth.kind != "crop"]
    assert summary["total"]["input_files"] == len(gt_files) + ground_truth[ground_truth.kind == "crop"].relpath.nunique()
    # kept rows = originals + duplicates + one row per annotated cell
    assert len(manifest) == len(ground_truth[ground_truth.kind != "bad"])
    assert sorted(manifest.image_id) == sorted(ground_truth[ground_truth.kind != "bad"].image_id)
    assert manifest.image_id.is_unique
    assert len(quarantine) == (ground_truth.kind == "bad").sum()
    on_disk = json.load(open(f"{out}/summary.json"))
    assert on_disk["total"] == summary["total"]


def test_bad_files_are_quarantined_with_the_right_reason(ingested, ground_truth, collection):
    out, summary = ingested
    q = pq.read_table(f"{out}/quarantine.parquet").to_pandas()
    roots = {d["name"]: d["uri"] for d in collection["datasets"]}
    got = {(r.dataset, r.uri[len(roots[r.dataset]) + 1:]): r.reason for r in q.itertuples()}
    bad = ground_truth[ground_truth.kind == "bad"]
    expected = {(r.dataset, r.relpath): r.expected_reason for r in bad.itertuples()}
    assert got == expected
    for name, d in summary["datasets"].items():
        assert d["quarantine_reasons"] == {k: 1 for k in ("empty_file", "truncated", "not_an_image", "too_small",
                                                          "too_large")}, name
    assert all(q.detail.str.len() > 0)


def test_manifest_schema_labels_and_patients(ingested, ground_truth):
    out, _ = ingested
    m = pq.read_table(f"{out}/ingested.parquet").to_pandas().set_index("image_id")
    for col in ("uri", "dataset", "modality", "source_label", "cell_type", "patient_id", "patient_label", "width",
                "height", "content_sha256", "pixel_sha256"):
        assert col in m.columns
    assert set(m.modality) == {"peripheral_blood", "bone_marrow"}
    assert (m.loc[m.dataset == "bmc", "modality"] == "bone_marrow").all()
    gt = ground_truth.set_index("image_id")
    hehr = m[m.dataset == "aml_hehr"]
    assert (hehr.patient_label == gt.loc[hehr.index, "patient_label"]).all()
    originals = m[gt.loc[m.index, "kind"].values == "original"]
    acevedo = originals[originals.dataset == "acevedo"]
    assert len(acevedo) and (acevedo.width == 360).all() and (acevedo.height == 363).all()
    assert (originals.loc[originals.dataset == "matek", "width"] == 400).all()


def test_unknown_labels_are_kept_and_reported(ingested):
    out, summary = ingested
    m = pq.read_table(f"{out}/ingested.parquet").to_pandas()
    unknown = m[m.cell_type.isna() & m.source_label.notna()]
    assert len(unknown) > 0  # e.g. the private set's "Blast cells" folder, LISC's "mixt"
    for name, d in summary["datasets"].items():
        counts = unknown[unknown.dataset == name].source_label.value_counts().to_dict()
        assert d["unknown_labels"] == counts, name
    assert "Blast cells" in summary["datasets"]["private"]["unknown_labels"]


def test_crops_are_written_one_per_cell(ingested, ground_truth):
    out, summary = ingested
    m = pq.read_table(f"{out}/ingested.parquet").to_pandas()
    crops = m[m.crop_box.notna()]
    assert len(crops) == (ground_truth.kind == "crop").sum() == summary["total"]["cropped_cells"]
    assert set(crops.dataset) == {"bccd", "segpc"}
    assert (crops.width == 64).all() and (crops.height == 64).all()
    assert all(os.path.exists(u) for u in crops.uri)
    assert (crops.source_uri != crops.uri).all()
    segpc = crops[crops.dataset == "segpc"]
    assert (segpc.cell_type == "plasma_cell").all()


def test_formats_modes_and_unicode_names(ingested):
    out, _ = ingested
    m = pq.read_table(f"{out}/ingested.parquet").to_pandas()
    private = m[m.dataset == "private"]
    assert set(private.format) >= {"PNG", "JPEG", "TIFF", "BMP"}
    assert (private.num_frames > 1).any()  # multi-page TIFF kept (first page), page count recorded
    assert any("größe" in u for u in private.uri) and any("细胞" in u for u in private.uri)
    assert any(" " in u for u in m[m.dataset == "lisc"].uri)


def test_rerun_skips_and_forced_rerun_gives_same_ids(ray_local, collection, tmp_path):
    specs = specs_of(collection, {"matek", "bccd", "private"})
    out = str(tmp_path / "run")
    first = run_ingest(specs, out)
    ids1 = sorted(pq.read_table(f"{out}/ingested.parquet").column("image_id").to_pylist())
    mtime = os.path.getmtime(f"{out}/ingested.parquet")
    again = run_ingest(specs, out)  # marker present: skipped, nothing rewritten
    assert again["total"] == first["total"] and os.path.getmtime(f"{out}/ingested.parquet") == mtime
    run_ingest(specs, out, force=True)
    assert sorted(pq.read_table(f"{out}/ingested.parquet").column("image_id").to_pylist()) == ids1
    assert not os.path.exists(f"{out}/_staging") or not os.listdir(f"{out}/_staging")


def test_ray_commit_writes_sorted_parts_equal_to_the_local_file(ray_local, collection, tmp_path):
    """scale.mode=ray: Ray Data sorts the kept rows and one task per sorted block writes a part; the parts in
    name order are the local commit's single file row for row (as later stages read them), and the summary is
    the same."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cytoray import tables
    from cytoray.curation.shards import ScaleConfig

    specs = specs_of(collection, {"matek", "bccd", "private"})
    local, dist = str(tmp_path / "local"), str(tmp_path / "ray")
    want = run_ingest(specs, local, scale=ScaleConfig(mode="local"))
    got = run_ingest(specs, dist, scale=ScaleConfig(mode="ray", shard_rows=16))

    parts = sorted(os.listdir(f"{dist}/ingested.parquet"))
    assert len(parts) >= 2 and all(p.startswith("part-") for p in parts)
    concat = pa.concat_tables([pq.read_table(f"{dist}/ingested.parquet/{p}") for p in parts])

    def run_relative(t, root):  # crops live under each run's own directory
        return t.set_column(1, "uri", pc.replace_substring(t.column("uri"), root, "<run>"))
    ref = pq.read_table(f"{local}/ingested.parquet")
    assert concat.schema == ref.schema
    assert run_relative(concat, dist).equals(run_relative(ref, local))
    assert pc.sum(pc.is_valid(concat.column("crop_box"))).as_py() > 0
    assert tables.read_table(f"{dist}/ingested.parquet").equals(concat)  # what later stages read

    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    files = concat.group_by("dataset").aggregate([("source_uri", "count_distinct")]).to_pylist()
    assert {r["dataset"]: r["source_uri_count_distinct"] for r in files} == \
        {name: d["kept_files"] for name, d in got["datasets"].items()}


def test_spec_validation_names_the_problem(collection):
    good = specs_of(collection, {"matek"})[0]
    with pytest.raises(ValueError, match="no datasets configured"):
        validate_specs([])
    with pytest.raises(ValueError, match="unique.*matek"):
        validate_specs([good, good])
    with pytest.raises(ValueError, match="modality 'blood'"):
        validate_specs([DatasetSpec("x", "matek", "/tmp", "blood")])
    with pytest.raises(ValueError, match="`uri` is required"):
        validate_specs([DatasetSpec("x", "matek")])
    with pytest.raises(ValueError, match="unknown layout"):
        validate_specs([DatasetSpec("x", "nope", "/tmp")])


def _fault_counts():
    """Page faults per 2 MB buffer allocated, filled and freed 50 times: in the malloc state seen in Ray workers
    (mmap threshold fixed at 128 KiB), then after ``keep_image_buffers_on_heap``."""
    import ctypes
    import resource

    import numpy as np

    from cytoray import runtime

    def churn():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            np.ones(2 << 20, np.uint8)  # a decoded 800 x 870 RGB image's worth
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50

    ctypes.CDLL("libc.so.6").mallopt(runtime._M_MMAP_THRESHOLD, 128 << 10)
    stuck = churn()
    assert runtime.keep_image_buffers_on_heap()
    churn()  # the heap grows once
    return stuck, churn()


def _decode_sets_up_malloc(rows):
    from cytoray import runtime, storage
    from cytoray.curation.ingest import DecodeBatch

    before = runtime._malloc_tuned
    DecodeBatch(IngestConfig(), storage.StorageConfig(), "/unused")(rows)
    return before, runtime._malloc_tuned


def test_decode_workers_reuse_image_buffers_instead_of_faulting_them_in(ray_local, tmp_path):
    """In Ray workers glibc's mmap threshold can stay at 128 KiB, and then every decoded image's buffers are
    mmap'ed and unmapped afresh (~110 page faults and ~27% more CPU per image, benchmarks/RESULTS.md). The
    test forces that state in a fresh worker and checks that ``keep_image_buffers_on_heap`` removes the faults
    (~512 per 2 MB buffer -> almost none) and that the decode callable calls it."""
    import uuid

    import pyarrow as pa
    from PIL import Image

    from cytoray.runtime import keep_image_buffers_on_heap

    if not keep_image_buffers_on_heap():
        pytest.skip("not glibc: nothing to tune")

    def fresh(fn):  # a new worker process (its own runtime env): no earlier task has touched its heap
        return ray_local.remote(num_cpus=0.5, max_calls=1,
                                runtime_env={"env_vars": {"CYTORAY_FRESH": uuid.uuid4().hex}})(fn)
    stuck, tuned = ray_local.get(fresh(_fault_counts).remote())
    assert stuck > 400 and tuned < 5, (stuck, tuned)  # 512 pages per buffer mapped afresh, then none

    Image.new("RGB", (64, 64), (200, 100, 150)).save(tmp_path / "a.png")
    rows = pa.Table.from_pylist([{"dataset": "d", "layout": "class_folders", "modality": "peripheral_blood",
                                  "uri": str(tmp_path / "a.png"), "relpath": "a.png", "source_label": None,
                                  "patient_id": None, "patient_label": None, "split": None, "boxes": None,
                                  "box_labels": None, "mask_uris": None}])
    assert ray_local.get(fresh(_decode_sets_up_malloc).remote(rows)) == (None, True)  # the decode task tunes
