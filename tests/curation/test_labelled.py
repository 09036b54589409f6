"""A held-out labelled manifest in one command (recipes/manifest.py, issue 31): class folders with odd files ->
manifest.parquet the probe reads; the probe pointed at the folder itself says in one line what to run."""

import json
import os
import time

import numpy as np
import pytest

from cytoray import tables
from cytoray.curation.synthetic.cells import Stain, render_cell
from cytoray.images import encode_png

CLASSES = ("lymphocyte", "monocyte", "eosinophil")


def _class_folders(root, per_class=8, seed=0):
    """A lab's class folders: 8 cells per class, one exact copy under another name, one truncated file, a note,
    a hidden file, and a folder named outside the taxonomy."""
    rng = np.random.default_rng(seed)
    for cls in (*CLASSES, "mystery_cell"):
        os.makedirs(os.path.join(root, cls))
        for i in range(per_class if cls in CLASSES else 2):
            with open(os.path.join(root, cls, f"{cls}_{i:03d}.png"), "wb") as fh:
                fh.write(encode_png(render_cell(cls if cls in CLASSES else "blast", 64, 0.3, Stain(), rng)))
    with open(os.path.join(root, "monocyte", "monocyte_000.png"), "rb") as fh:
        data = fh.read()
    with open(os.path.join(root, "monocyte", "monocyte_copy.png"), "wb") as fh:
        fh.write(data)
    with open(os.path.join(root, "lymphocyte", "broken.png"), "wb") as fh:
        fh.write(data[:60])
    with open(os.path.join(root, "README.txt"), "w") as fh:
        fh.write("held-out cells, do not train on them")
    with open(os.path.join(root, "eosinophil", ".DS_Store"), "wb") as fh:
        fh.write(b"\0")


def test_heldout_manifest_command_and_the_probe_reads_it(ray_local, tmp_path, monkeypatch):
    from cytoray.curation import labelled
    from cytoray.eval import probe
    from cytoray.eval.metrics import ProbeError

    _class_folders(str(tmp_path / "data" / "heldout"))
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    t0 = time.perf_counter()
    with pytest.raises(ProbeError) as err:  # the natural first try: the folder itself
        probe.main(["--checkpoint", "handcrafted", "--manifest", "data/heldout"])
    assert time.perf_counter() - t0 < 2.0
    folder = f"{tmp_path}/data/heldout"
    assert str(err.value) == (
        f"labelled manifest '{folder}' is a folder without Parquet files (images, class folders?), not a manifest; "
        "a labelled manifest is Parquet (image_id, uri, label column); for class folders or a label table run: "
        f"python recipes/manifest.py --dataset {folder} --out {folder}-manifest  and probe --manifest "
        f"{folder}-manifest/manifest.parquet (docs/evaluation.md)")

    summary = labelled.main(["--dataset", "data/heldout", "--out", "runs/heldout", "ray.num_cpus=2"])
    out = tmp_path / "runs" / "heldout"
    assert summary == json.loads((out / "summary.json").read_text())
    # 8 x 3 + 2 cells, the copy, the broken file and the README listed (a file under the root may be an image);
    # .DS_Store is hidden, not listed
    assert (summary["input_files"], summary["quarantined_files"], summary["kept_images"]) == (29, 2, 27)
    assert summary["ignored_files"] == 1 and summary["quarantine_reasons"] == {"not_an_image": 1, "truncated": 1}
    assert (summary["exact_copies"], summary["manifest_rows"]) == (1, 26)
    assert summary["cell_types"] == {"eosinophil": 8, "lymphocyte": 8, "monocyte": 8, "unknown": 2}
    assert summary["labels_outside_taxonomy"] == ["mystery_cell"]
    man = tables.read_table(str(out / "manifest.parquet"))
    assert {"image_id", "uri", "dataset", "cell_type", "source_label"} <= set(man.column_names)
    assert all(u.startswith(f"{folder}/") for u in man.column("uri").to_pylist())
    assert set(man.column("dataset").to_pylist()) == {"heldout"}
    assert "heldout/monocyte/monocyte_copy.png" not in man.column("image_id").to_pylist()  # the copy goes (keep policy: image_id order)
    dups = tables.read_table(str(out / "duplicates.parquet")).to_pylist()
    assert [(d["image_id"], d["duplicate_of"], d["reason"]) for d in dups] == [
        ("heldout/monocyte/monocyte_copy.png", "heldout/monocyte/monocyte_000.png", "exact")]
    assert sorted(tables.read_table(str(out / "quarantine.parquet")).column("uri").to_pylist()) == [
        f"{folder}/README.txt", f"{folder}/lymphocyte/broken.png"]
    lines = labelled.summary_lines(summary, str(out))
    assert lines[0] == ("manifest: 29 files -> 26 labelled images (2 quarantined, 1 exact copy removed; 1 hidden or "
                        "outside the layout, not listed); cell types: eosinophil 8, lymphocyte 8, monocyte 8, unknown 2")
    assert "probe.label_column=source_label" in lines[1]

    monkeypatch.chdir(tmp_path / "data")  # another working directory: the manifest's uris are absolute
    results = probe.main(["--checkpoint", "handcrafted", "--manifest", "../runs/heldout/manifest.parquet",
                          "probe.num_actors=0", "probe.folds=2", "probe.c_grid=[1.0]"])
    (r,) = results
    assert r["manifest"] == str(out / "manifest.parquet") and r["classes"] == sorted(CLASSES)
    assert r["images"] == 24 and r["unlabelled"] == 2
