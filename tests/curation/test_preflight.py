"""Every input is checked before work starts, and recipes report a user's mistake in one line."""

import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cytoray.curation.adapters import AdapterError
from cytoray.curation.ingest import DatasetSpec
from cytoray.curation.pipeline import CurateConfig, run_curation
from cytoray.manifest import ManifestError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bad_inputs_fail_in_seconds_and_write_nothing(collection, tmp_path):
    good = [DatasetSpec(**d) for d in collection["datasets"]]
    out = tmp_path / "out" / "run"
    bad = DatasetSpec(name="typo", layout="class_folders", uri=str(tmp_path / "no_such_dir"))
    t0 = time.perf_counter()
    with pytest.raises(AdapterError, match="dataset 'typo': dataset root does not exist: .*no_such_dir"):
        run_curation(CurateConfig(output_uri=str(out), datasets=[*good, bad]))
    assert time.perf_counter() - t0 < 2.0
    no_uri = str(tmp_path / "eval.parquet")
    pq.write_table(pa.table({"image_id": ["a"], "path": ["x.png"]}), no_uri)
    from cytoray.curation.dedup import DedupConfig

    with pytest.raises(ManifestError, match="eval.parquet has no 'uri' column"):
        run_curation(CurateConfig(output_uri=str(out), datasets=good, dedup=DedupConfig(eval_manifests=[no_uri])))
    apl = next(d for d in collection["datasets"] if d["layout"] == "apl_aml")
    with pytest.raises(AdapterError, match="apl_aml layout needs master.csv"):
        run_curation(CurateConfig(output_uri=str(out), datasets=[DatasetSpec(**{**apl, "uri": str(tmp_path)})]))
    # a root that exists but holds no image file (an unfinished download: a notes file, empty class folders, a
    # hidden folder of thumbnails), and a label table without rows
    empty = tmp_path / "empty"
    for folder in ("neutrophil", "lymphocyte", ".thumbs"):
        (empty / folder).mkdir(parents=True)
    (empty / "README.txt").write_text("download pending")
    (empty / ".thumbs" / "a.png").write_bytes(b"")
    t0 = time.perf_counter()
    with pytest.raises(AdapterError, match=r"dataset 'mine': no image files under .*empty \(1 file: hidden, label "
                                           r"tables or documents only\); check the dataset's uri"):
        run_curation(CurateConfig(output_uri=str(out), datasets=[
            *good, DatasetSpec(name="mine", layout="class_folders", uri=str(empty))]))
    assert time.perf_counter() - t0 < 2.0
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "labels.csv").write_text("uri,label\n")
    with pytest.raises(AdapterError, match=r"dataset 'tab': table .*labels.csv lists no images"):
        run_curation(CurateConfig(output_uri=str(out), datasets=[
            DatasetSpec(name="tab", layout="table", uri=str(tmp_path / "table"))]))
    assert not (tmp_path / "out").exists()


def _curate(args, env_extra=None):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "recipes/curate.py", "--config", "recipes/configs/curate.yaml", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_recipe_errors_are_one_line_unless_debugging(tmp_path):
    ds = tmp_path / "datasets.yaml"
    ds.write_text(f"datasets:\n  - {{name: mine, layout: class_folders, uri: {tmp_path / 'missing'}}}\n")
    out = tmp_path / "run"
    proc = _curate(["--config", str(ds), f"output_uri={out}"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    assert first.startswith("cytoray: error: dataset 'mine': dataset root does not exist") and "missing" in first
    assert not out.exists()
    proc = _curate(["--config", str(ds), f"output_uri={out}", "dedup.treshold=0.9", "--debug"])
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "Did you mean" in proc.stderr and "dedup.treshold" in proc.stderr
