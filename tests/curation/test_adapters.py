import os

import pytest

from cytoray import storage
from cytoray.curation import taxonomy
from cytoray.curation.adapters import ADAPTERS, AdapterError, get_adapter


def listing(collection, name, options=None):
    spec = next(d for d in collection["datasets"] if d["name"] == name)
    fs, root = storage.filesystem(spec["uri"])
    return get_adapter(spec["layout"], options).list(fs, root, spec["uri"])


def files_in_gt(gt, name):
    return set(gt[(gt.dataset == name) & (gt.kind != "crop")].relpath)


@pytest.mark.parametrize("name", ["acevedo", "matek", "bmc", "raabin", "lisc", "aml_hehr", "apl_aml",
                                  "private", "table_set"])
def test_single_cell_layouts_list_every_image_with_its_label(collection, ground_truth, name):
    out = listing(collection, name)
    assert {r.relpath for r in out.records} == files_in_gt(ground_truth, name)
    assert out.ignored == []
    gt = ground_truth[ground_truth.dataset == name].set_index("relpath")
    layout = next(d["layout"] for d in collection["datasets"] if d["name"] == name)
    labelled = [r for r in out.records if gt.loc[r.relpath, "kind"] != "bad" and r.source_label is not None]
    if name != "aml_hehr":  # Hehr has patient labels only
        assert len(labelled) > 0.8 * len(out.records) - 5
    # the unified type of each source label matches the rendered class wherever the taxonomy is specific
    specific = {"neutrophil_segmented", "neutrophil_band", "lymphocyte", "monocyte", "eosinophil", "basophil",
                "erythroblast", "plasma_cell", "promyelocyte", "myelocyte", "metamyelocyte"}
    checked = 0
    for r in labelled:
        unified, truth = taxonomy.unify(layout, r.source_label), gt.loc[r.relpath, "true_class"]
        if unified in specific and truth in specific:
            assert unified == truth, (r.relpath, r.source_label, unified, truth)
            checked += 1
    assert checked > 0 or name == "aml_hehr"


def test_patient_level_layouts_carry_patient_labels(collection, ground_truth):
    for name in ("aml_hehr", "apl_aml"):
        out = listing(collection, name)
        gt = ground_truth[(ground_truth.dataset == name) & (ground_truth.kind == "original")].set_index("relpath")
        for r in out.records:
            if r.relpath in gt.index:
                assert (r.patient_id, r.patient_label) == (gt.loc[r.relpath, "patient_id"], gt.loc[r.relpath, "patient_label"])
    hehr = listing(collection, "aml_hehr")
    assert {r.patient_label for r in hehr.records} == {"CBFB_MYH11", "NPM1", "PML_RARA", "RUNX1_RUNX1T1", "SCD"}
    assert "metadata.csv" in hehr.metadata_files


def test_raabin_records_split(collection):
    assert {r.split for r in listing(collection, "raabin").records} == {"Train", "TestA"}


def test_detection_layout_gives_wbc_boxes_only(collection, ground_truth):
    out = listing(collection, "bccd")
    crops = ground_truth[(ground_truth.dataset == "bccd") & (ground_truth.kind == "crop")]
    by_file = crops.groupby("relpath").size().to_dict()
    for r in out.records:
        if r.relpath.startswith("BCCD/JPEGImages/BloodImage"):
            assert len(r.boxes) == by_file[r.relpath]  # RBC / platelet boxes are not cells to crop
            assert all(lab in (None, "NEUTROPHIL", "LYMPHOCYTE", "MONOCYTE", "EOSINOPHIL") for lab in r.box_labels)
    assert any(f.endswith(".xml") for f in out.metadata_files) and "labels.csv" in out.metadata_files


def test_segmentation_layout_pairs_masks_with_fields(collection, ground_truth):
    out = listing(collection, "segpc")
    crops = ground_truth[(ground_truth.dataset == "segpc") & (ground_truth.kind == "crop")]
    by_file = crops.groupby("relpath").size().to_dict()
    for r in out.records:
        if r.relpath in by_file:
            assert len(r.mask_uris) == by_file[r.relpath]
            assert all("/train/y/" in u for u in r.mask_uris)


def test_files_outside_layout_are_reported_not_dropped(tmp_path):
    (tmp_path / "NGS").mkdir()
    (tmp_path / "NGS" / "NGS_0001.tiff").write_bytes(b"x")
    (tmp_path / "README.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_text("x")
    out = get_adapter("matek").list(*storage.filesystem(str(tmp_path)), str(tmp_path))
    assert [r.relpath for r in out.records] == ["NGS/NGS_0001.tiff"]
    assert sorted(out.ignored) == [(".DS_Store", "hidden_file"), ("README.txt", "outside_layout")]


def test_table_adapter_resolves_relative_uris_and_reports_strays(collection):
    out = listing(collection, "table_set")
    assert all(r.uri.startswith(next(d["uri"] for d in collection["datasets"] if d["name"] == "table_set"))
               for r in out.records)
    assert {r.patient_id for r in out.records} - {None} <= {f"P{i}" for i in range(5)}


def test_clear_errors(tmp_path, collection):
    with pytest.raises(AdapterError, match="unknown layout 'pbc'.*class_folders"):
        get_adapter("pbc")
    with pytest.raises(AdapterError, match="does not exist"):
        get_adapter("matek").list(*storage.filesystem(str(tmp_path / "missing")), str(tmp_path / "missing"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "labels.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(AdapterError, match="no 'uri' column.*uri_column"):
        get_adapter("table").list(*storage.filesystem(str(tmp_path / "t")), str(tmp_path / "t"))
    out = get_adapter("table", {"uri_column": "path"}).list(*storage.filesystem(str(tmp_path / "t")), str(tmp_path / "t"))
    assert out.records[0].relpath == "a.png" and out.records[0].source_label == "x"
    with pytest.raises(AdapterError, match="apl_aml layout needs master.csv"):
        root = os.path.join(collection["root"], "acevedo")
        get_adapter("apl_aml").list(*storage.filesystem(root), root)


def test_every_layout_has_an_adapter_and_a_taxonomy_entry():
    assert set(ADAPTERS) == {"acevedo", "matek", "bmc", "raabin", "lisc", "aml_hehr", "apl_aml", "bccd", "segpc",
                             "class_folders", "table"}
    assert taxonomy.unify("matek", "NGS") == "neutrophil_segmented"
    assert taxonomy.unify("bmc", "PLM") == "plasma_cell"
    assert taxonomy.unify("acevedo", "PMY") == "promyelocyte"
    assert taxonomy.unify("class_folders", "Neutrophil") == "neutrophil_segmented"
    assert taxonomy.unify("table", "plasma cell") == "plasma_cell"
    assert taxonomy.unify("lisc", "mixt") is None and taxonomy.unify("bmc", None) is None
    assert all(v in taxonomy.CELL_TYPES for t in taxonomy.LAYOUT_LABELS.values() for v in t.values())
    assert "| matek | `NGS` | neutrophil_segmented |" in taxonomy.markdown_table()


def test_taxonomy_doc_matches_code():
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "taxonomy.md")
    assert open(doc).read() == taxonomy.markdown_doc(), "run: python -m cytoray.curation.taxonomy > docs/taxonomy.md"


def test_preflight_finds_no_image_only_where_there_is_none(tmp_path, s3):
    """The pre-flight listing (Adapter.check) fails a root with no image file, passes one with images in any
    format ingest decodes (by content, whatever the extension) and gives no verdict past its entry limit."""
    from cytoray.curation import adapters

    def check(layout, root, uri=None, cfg=None):
        fs, path = storage.filesystem(uri or str(root), cfg)
        get_adapter(layout).check(fs, path, uri or str(root))

    (tmp_path / "docs" / "blast").mkdir(parents=True)
    for name in ("README.md", "labels.csv", "blast/.DS_Store"):
        (tmp_path / "docs" / name).write_text("x")
    with pytest.raises(AdapterError, match=r"no image files under .*docs \(3 files"):
        check("class_folders", tmp_path / "docs")
    (tmp_path / "docs" / "blast" / "cell_0001").write_bytes(b"P6 1 1 255 \x00\x00\x00")  # a PPM without extension
    check("class_folders", tmp_path / "docs")
    (tmp_path / "masks" / "train" / "y").mkdir(parents=True)  # SegPC: instance masks are its metadata, not images
    (tmp_path / "masks" / "train" / "y" / "1_1.bmp").write_bytes(b"BM")
    with pytest.raises(AdapterError, match="no image files under"):
        check("segpc", tmp_path / "masks")
    assert adapters._first_image(*storage.filesystem(str(tmp_path / "docs")), lambda rel: False, limit=2)[0]
    storage.write_bytes("s3://cytoray-test/preflight/empty/notes.txt", b"x", s3)  # object storage: one listing
    with pytest.raises(AdapterError, match=r"no image files under s3://cytoray-test/preflight/empty \(1 file:"):
        check("class_folders", None, "s3://cytoray-test/preflight/empty", s3)
    storage.write_bytes("s3://cytoray-test/preflight/empty/blast/a.jpg", b"x", s3)
    check("class_folders", None, "s3://cytoray-test/preflight/empty", s3)
