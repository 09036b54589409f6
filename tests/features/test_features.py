"""Shared features: preprocessing read back from the checkpoint a run wrote, the one feature actor, and the
Parquet / manifest helpers they rely on."""

import numpy as np
import pyarrow as pa
import pytest

from cytoray.features.preprocess import IMAGENET_MEAN, Preprocess


def _cells(n=3, size=40):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (size, size + 7, 3), dtype=np.uint8) for _ in range(n)]


def test_preprocess_record_round_trip_and_bad_records():
    p = Preprocess(size=56, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    assert Preprocess.from_record(p.record()) == p
    assert Preprocess.from_record(None) == Preprocess()  # no record: ImageNet statistics
    assert Preprocess.from_record(p.record(), size=28).size == 28
    x = p(_cells())
    assert x.shape == (3, 3, 56, 56) and x.dtype.is_floating_point
    with pytest.raises(ValueError, match="unknown keys \\['interpolation'\\]"):
        Preprocess.from_record({"interpolation": "bilinear"})


def test_features_of_an_export_use_the_runs_recorded_normalisation(tmp_path):
    import torch

    from cytoray.features.backbone import build_backbone, vit_features
    from cytoray.features.extract import FeatureActor, FeatureSpec
    from cytoray.platform.models.checkpoints import export_dinobloom
    from cytoray.platform.models.vit import build_vit

    torch.manual_seed(0)
    model = build_vit(arch="vit_debug", patch_size=8, img_size=32, layerscale=0.1).eval()  # input-dependent CLS
    run_pre = Preprocess(size=32, mean=(0.7, 0.2, 0.6), std=(0.1, 0.3, 0.2))
    export_dinobloom(model, str(tmp_path / "t.pth"), extra={"preprocess": run_pre.record()})
    export_dinobloom(model, str(tmp_path / "bare.pth"))
    cells = _cells()

    built, recorded = build_backbone(str(tmp_path / "t.pth"))
    assert Preprocess.from_record(recorded) == run_pre and build_backbone(str(tmp_path / "bare.pth"))[1] is None
    got = FeatureActor(FeatureSpec(backbone=str(tmp_path / "t.pth"))).features(cells)
    np.testing.assert_allclose(got, vit_features(model, cells, run_pre), rtol=1e-5, atol=1e-6)
    imagenet = FeatureActor(FeatureSpec(backbone=str(tmp_path / "bare.pth"))).features(cells)
    np.testing.assert_allclose(imagenet, vit_features(model, cells, Preprocess(size=32)), rtol=1e-5, atol=1e-6)
    assert np.abs(got - imagenet).max() > 1e-3  # the recorded statistics matter
    assert Preprocess().mean == IMAGENET_MEAN


def test_vectors_pack_and_unpack_through_slices_and_parquet(tmp_path):
    from cytoray import tables

    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    col = tables.pack_vectors(x)
    np.testing.assert_array_equal(tables.unpack_vectors(col), x)
    np.testing.assert_array_equal(tables.unpack_vectors(col.slice(2, 3)), x[2:5])  # offsets respected
    t = pa.table({"image_id": [f"{i}" for i in range(6)][::-1], "v": col})
    tables.write_table(str(tmp_path / "d" / "v.parquet"), t)  # sorted by image_id, written atomically
    back = tables.read_table(str(tmp_path / "d" / "v.parquet"))
    assert back.column("image_id").to_pylist() == [str(i) for i in range(6)]
    np.testing.assert_array_equal(tables.unpack_vectors(back.column("v")), x[::-1])
    assert tables.read_table(str(tmp_path / "d"), columns=["image_id"]).num_rows == 6  # a directory dataset
    assert not [p for p in (tmp_path / "d").iterdir() if ".tmp" in p.name]
    with pytest.raises(FileNotFoundError, match="missing.parquet does not exist"):
        tables.read_table(str(tmp_path / "missing.parquet"))


def test_read_manifest_names_the_file_the_columns_and_the_fix(tmp_path):
    from cytoray import tables
    from cytoray.manifest import ManifestError, read_manifest

    uri = str(tmp_path / "m.parquet")
    tables.write_table(uri, pa.table({"image_id": ["a", "b"], "uri": ["x", "y"], "repeats": [1, 2]}))
    t = read_manifest(uri, columns=("image_id", "uri"), optional=("repeats", "weight"))
    assert t.column_names == ["image_id", "uri", "repeats"]
    with pytest.raises(ManifestError, match=r"data.manifest_uri '.*m.parquet' lacks column\(s\) \['cell_type'\].*fix it"):
        read_manifest(uri, columns=("image_id", "cell_type"), purpose="data.manifest_uri", fix="fix it")
    with pytest.raises(ManifestError, match="cannot be read"):
        read_manifest(str(tmp_path / "none.parquet"))
    tables.write_table(uri, pa.table({"image_id": pa.array([], pa.string())}))
    with pytest.raises(ManifestError, match="has no rows"):
        read_manifest(uri)
