"""Relative paths are resolved where they are read (issue 31): config locations against the working directory at
load, a manifest's relative ``uri`` values against the manifest's folder; pre-flight opens a manifest's first images
and fails in one line, also under a ``ray job submit`` working-dir copy."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cytoray import config, manifest, storage
from cytoray.images import encode_png
from cytoray.manifest import ManifestError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_relative_config_locations_are_absolute_at_load_and_in_config_yaml(tmp_path, monkeypatch):
    from cytoray.curation.pipeline import CurateConfig
    from cytoray.platform.config import load_pretrain_config

    monkeypatch.chdir(tmp_path)
    cfg = load_pretrain_config(["data.manifest_uri=runs/c/manifest.parquet", "run.name=r",
                                "eval.manifests=[eval/heldout.parquet,s3://bucket/eval.parquet]",
                                "train.init_checkpoint=weights/dinov2.pth", "eval.probe.cache_dir=cache"], "debug")
    here = str(tmp_path)
    assert cfg.data.manifest_uri == f"{here}/runs/c/manifest.parquet"
    assert list(cfg.eval.manifests) == [f"{here}/eval/heldout.parquet", "s3://bucket/eval.parquet"]
    assert (cfg.train.init_checkpoint, cfg.run.storage_path) == (f"{here}/weights/dinov2.pth", f"{here}/runs")
    assert cfg.eval.probe.cache_dir == f"{here}/cache"
    saved = yaml.safe_load(open(config.save_config(cfg, str(tmp_path / "run"))))
    assert saved["data"]["manifest_uri"] == f"{here}/runs/c/manifest.parquet"
    assert saved["eval"]["manifests"][1] == "s3://bucket/eval.parquet"
    datasets = tmp_path / "datasets.yaml"
    datasets.write_text(yaml.safe_dump({"datasets": [
        {"name": "lab", "layout": "class_folders", "uri": "data/lab"},
        {"name": "pub", "layout": "matek", "uri": "s3://bucket/AML-Cytomorphology_LMU"},
        {"name": "abs", "layout": "class_folders", "uri": "/srv/data/abs"}]}))
    cur = config.load_config(CurateConfig, None, [datasets], ["output_uri=runs/curate", "embeddings=emb.parquet"])
    assert [d.uri for d in cur.datasets] == [f"{here}/data/lab", "s3://bucket/AML-Cytomorphology_LMU", "/srv/data/abs"]
    assert (cur.output_uri, cur.embeddings, cur.balance.mapping_file) == (f"{here}/runs/curate",
                                                                         f"{here}/emb.parquet", None)
    assert storage.absolute("~/w.pth") == os.path.expanduser("~/w.pth")
    assert storage.absolute("file:///x/y") == "file:///x/y"


def _cells(folder, names):
    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(encode_png(np.full((16, 16, 3), i, np.uint8)))


def test_relative_uri_values_resolve_against_the_manifest_folder(tmp_path, monkeypatch):
    """A hand-made table: uris relative to the folder holding it, read from another working directory; an
    object-storage manifest resolves them under its own prefix; other values stay as written."""
    _cells(tmp_path / "sets" / "cells", ["a.png", "b.png"])
    path = tmp_path / "sets" / "heldout.parquet"
    pq.write_table(pa.table({"image_id": ["a", "b", "c"], "uri": ["cells/a.png", "./cells/b.png", "s3://x/c.png"],
                             "cell_type": ["blast", "monocyte", "blast"]}), path)
    monkeypatch.chdir(tmp_path)  # neither the manifest's folder nor the repository
    table = manifest.read_manifest(str(path))
    assert table.column("uri").to_pylist() == [str(tmp_path / "sets/cells/a.png"), str(tmp_path / "sets/cells/b.png"),
                                               "s3://x/c.png"]
    from cytoray.platform.data.stream import read_manifest as read_training_manifest

    assert read_training_manifest("sets/heldout.parquet").column("uri")[0].as_py() == str(tmp_path / "sets/cells/a.png")
    manifest.check_images(table, str(path), count=2)  # opens the first two: both found
    remote = manifest.resolve_uris(pa.table({"uri": ["cells/a.png", "../b.png"]}), "s3://bucket/eval/m.parquet")
    assert remote.column("uri").to_pylist() == ["s3://bucket/eval/cells/a.png", "s3://bucket/b.png"]


def test_probe_preflight_fails_in_seconds_with_one_line(tmp_path):
    """A manifest whose uris are relative to another folder: the probe stops before Ray starts or a feature is
    extracted, naming the manifest, the uri and the fix (it was a 58-line Ray Data traceback)."""
    from cytoray.eval import probe

    _cells(tmp_path / "cells", ["a.png"])
    path = tmp_path / "eval" / "manifest.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image_id": ["a", "b"], "uri": ["cells/a.png", "cells/b.png"],
                             "cell_type": ["blast", "monocyte"]}), path)
    t0 = time.perf_counter()
    with pytest.raises(ManifestError) as err:
        probe.main(["--checkpoint", "handcrafted", "--manifest", str(path), "ray.address=127.0.0.1:1"])
    assert time.perf_counter() - t0 < 2.0
    message = str(err.value)
    assert "\n" not in message and message == (
        f"labelled manifest '{path}': image uri '{tmp_path}/eval/cells/a.png' (row 0) cannot be opened (not found); "
        "write absolute or object-storage uris, or keep relative uris relative to the manifest's folder")
    # pretraining's start-up checks open the first images of the training manifest and of eval.manifests
    from cytoray.platform.config import load_pretrain_config
    from cytoray.platform.train import validate

    cfg = config.to_object(load_pretrain_config(
        ["--config", os.path.join(REPO, "recipes", "configs", "cpu_debug.yaml"), f"data.manifest_uri={path}",
         "run.name=x", "train.final_export=[]"], "debug"))
    with pytest.raises(ManifestError, match=r"^training manifest \(data.manifest_uri\) '.*': image uri '.*eval/cells/a.png' "
                                            r"\(row 0\) cannot be opened \(not found\); write absolute"):
        validate(cfg)
    # curation's leakage guard reads the same manifest: its pre-flight stops on it too
    from cytoray.curation.dedup import DedupConfig
    from cytoray.curation.ingest import DatasetSpec
    from cytoray.curation.pipeline import CurateConfig, preflight

    lab = DatasetSpec(name="lab", layout="class_folders", uri=str(tmp_path / "cells"))
    with pytest.raises(ManifestError, match=r"^dedup.eval_manifests '.*manifest.parquet': image uri .*eval/cells/a.png"):
        preflight(CurateConfig(output_uri=str(tmp_path / "run"), datasets=[lab],
                               dedup=DedupConfig(eval_manifests=[str(path)])))


def test_job_submit_working_dir_copy_names_the_cause(tmp_path):
    """`ray job submit --working-dir .` runs the recipe in Ray's copy of the folder, without git-ignored runs/:
    a relative --manifest fails in one line that says so."""
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {}}
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "probe.py"), "--checkpoint", "handcrafted",
                           "--manifest", "runs/demo/eval/manifest.parquet"], cwd=copy, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first == (f"cytoray: error: labelled manifest {copy}/runs/demo/eval/manifest.parquet does not exist "
                     f"(this ray job runs in Ray's copy of --working-dir, {copy}, which has no git-ignored folders "
                     "such as runs/: pass absolute paths that exist on every node, or object-storage URIs)")


def test_file_scheme_windows_paths_and_non_parquet_files(tmp_path, monkeypatch):
    """A relative ``file://`` path is resolved like a bare one (split_protocol would read it against whichever
    process's working directory); Windows paths are left as written, not glued under the working directory; a
    label table passed as a manifest is named as not Parquet, without the advice to delete it."""
    from cytoray.curation.pipeline import CurateConfig

    monkeypatch.chdir(tmp_path)
    here = str(tmp_path)
    assert storage.absolute("file://runs/x") == f"file://{here}/runs/x"
    assert storage.absolute("local://runs/x") == f"local://{here}/runs/x"
    assert storage.absolute("file://a.png", f"{here}/sets") == f"file://{here}/sets/a.png"
    assert storage.absolute("file://a.png", "s3://bucket/sets") == "file://a.png"  # never made an object key
    for windows in ("C:\\data\\a.png", "C:/data/a.png", "\\\\server\\share\\a.png"):
        assert storage.absolute(windows) == windows and not storage.is_relative_path(windows)
    cur = config.load_config(CurateConfig, None, [], ["output_uri=file://runs/curate"])
    assert cur.output_uri == f"file://{here}/runs/curate"
    examples = ["cells/a.png", "../b.png", "/abs/c.png", "~/d.png", "C:\\e.png", "C:/e.png", "\\\\srv\\f.png",
                "file://cells/a.png", "file:///abs/a.png", "local://x/y.png", "s3://b/k.png", "gs://b/k.png", "",
                "file://", "a/b://c.png"]
    assert storage.relative_to_base_mask(pa.array(examples + [None])).to_pylist() == [
        storage.relative_to_base(u) for u in examples] + [False]  # the vectorised rule is the scalar one
    assert [storage.relative_to_base(u) for u in examples[:3]] == [True, True, False]
    values = ["file://cells/a.png", "C:\\img\\b.png", "file:///abs/c.png"]
    table = manifest.resolve_uris(pa.table({"uri": values}), f"{here}/sets/m.parquet")
    assert table.column("uri").to_pylist() == [f"file://{here}/sets/cells/a.png", *values[1:]]

    (tmp_path / "labels.csv").write_text("uri,label\ncells/a.png,blast\n")
    with pytest.raises(ManifestError) as err:
        manifest.read_manifest(f"{here}/labels.csv", purpose="labelled manifest", fix="make one")
    assert str(err.value) == f"labelled manifest '{here}/labels.csv' is a .csv file, not Parquet; make one"


def test_curation_in_a_job_submit_copy_names_the_cause(tmp_path, monkeypatch):
    """Curation's pre-flight under `ray job submit --working-dir .`: a relative dataset root or held-out manifest
    missing in Ray's copy says why, as the probe and pretraining do."""
    from cytoray.curation.pipeline import CurateConfig, preflight

    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123"
    copy.mkdir(parents=True)
    (tmp_path / "lab" / "blast").mkdir(parents=True)
    _cells(tmp_path / "lab" / "blast", ["a.png"])
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg.zip"}}))
    note = (f" (this ray job runs in Ray's copy of --working-dir, {copy}, which has no git-ignored folders such as "
            "runs/: pass absolute paths that exist on every node, or object-storage URIs)")
    datasets = copy / "datasets.yaml"
    datasets.write_text(yaml.safe_dump({"datasets": [{"name": "lab", "layout": "class_folders", "uri": "data/lab"}]}))
    cfg = config.to_object(config.load_config(CurateConfig, None, [datasets], ["output_uri=runs/c"]))
    with pytest.raises(Exception, match=r"^dataset 'lab': .*" + re.escape(note) + "$"):
        preflight(cfg)
    cfg.datasets[0].uri = str(tmp_path / "lab")  # the root exists; the held-out manifest is relative
    cfg.dedup.eval_manifests = [f"{copy}/runs/eval/manifest.parquet"]
    with pytest.raises(ManifestError) as err:
        preflight(cfg)
    assert str(err.value) == f"dedup.eval_manifests: {copy}/runs/eval/manifest.parquet does not exist{note}"


def test_probe_preflight_names_a_mistyped_method_and_the_label_table_fix(tmp_path):
    """A mistyped probe method fails before any feature is extracted; a label table's suggested manifest folder is
    named after the table, not `labels.csv-manifest`."""
    from cytoray.eval import probe
    from cytoray.eval.metrics import ProbeError

    _cells(tmp_path / "cells", ["a.png"])
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "uri": [f"{tmp_path}/cells/a.png"], "cell_type": ["blast"]}), path)
    with pytest.raises(ProbeError, match=r"^probe.methods=\['linaer'\]: choose from "):
        probe.preflight([str(path)], probe.ProbeConfig(methods=["linaer"]))
    probe.preflight([str(path)], probe.ProbeConfig())  # the defaults pass
    assert f"--dataset {tmp_path}/labels.csv --out {tmp_path}/labels-manifest " in probe.manifest_command(
        f"{tmp_path}/labels.csv")
