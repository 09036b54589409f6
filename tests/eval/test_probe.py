"""Evaluation: linear probe, kNN, ABMIL on known features; feature extraction on Ray with the cache; recipe."""

import json
import os

import numpy as np
import pytest

from cytoray.eval.methods import knn_predict
from cytoray.eval.metrics import ProbeError
from cytoray.eval.mil import MILConfig, evaluate_mil
from cytoray.eval.probe import ProbeConfig, score_features


def _blobs(n_per=30, classes=4, dim=16, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * sep
    x = np.concatenate([c + rng.normal(size=(n_per, dim)) for c in centres]).astype(np.float32)
    y = np.repeat([f"class_{i}" for i in range(classes)], n_per)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_probe_and_knn_separate_known_classes_and_not_noise():
    x, y = _blobs()
    cfg = ProbeConfig(c_grid=[0.1, 1.0], folds=5)
    res = score_features(x, y.tolist(), None, cfg)
    assert res["protocol"] == "kfold" and res["folds"] == 5 and res["images"] == 120
    assert set(res["methods"]) == {"linear", "knn1", "knn20", "knn20_T0.07"}
    for m in res["methods"].values():
        assert m["balanced_accuracy"] > 0.9 and sum(map(sum, m["confusion"])) == 120
    noise = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    chance = score_features(noise, y.tolist(), None, cfg)
    assert chance["methods"]["linear"]["balanced_accuracy"] < 0.45  # 4 classes: chance 0.25
    # fixed split (BMC-style) is picked automatically when the manifest has train and test rows
    split = np.where(np.arange(120) % 4 == 0, "test", "train").tolist()
    fixed = score_features(x, y.tolist(), split, cfg)
    assert fixed["protocol"] == "fixed" and fixed["images"] == 120 and sum(map(sum, fixed["methods"]["linear"]["confusion"])) == 30
    # unlabelled rows and too-rare classes are reported, not silently used
    labels = y.tolist()[:-1] + [None]
    labels[0] = "singleton"
    part = score_features(x, labels, None, cfg)
    assert part["unlabelled"] == 1 and part["left_out_classes"] == {"singleton": 1} and part["images"] == 118
    with pytest.raises(ProbeError, match=">= 2 classes"):
        score_features(x, ["a"] * 120, None, cfg)
    with pytest.raises(ProbeError, match="protocol=fixed needs a 'split' column"):
        score_features(x, y.tolist(), None, ProbeConfig(protocol="fixed"))


def test_knn_votes():
    x_tr = np.array([[1, 0], [0.9, 0.1], [0, 1]], np.float32)
    x_tr /= np.linalg.norm(x_tr, axis=1, keepdims=True)
    y_tr = np.array([0, 0, 1])
    q = np.array([[0.2, 1.0]], np.float32)
    assert knn_predict(x_tr, y_tr, q, 1, 2, None).tolist() == [1]
    assert knn_predict(x_tr, y_tr, q, 3, 2, None).tolist() == [0]  # uniform: two votes beat one
    assert knn_predict(x_tr, y_tr, q, 3, 2, 0.07).tolist() == [1]  # weighted: the close one wins


def test_abmil_beats_chance_on_patient_bags():
    rng = np.random.default_rng(0)
    feats, pids, labels = [], [], []
    protos = rng.normal(size=(3, 16))  # cell types; a subtype = a different share of type 2 ("blasts")
    for p in range(24):
        sub = p % 2
        for _ in range(30):
            t = 2 if rng.random() < (0.5 if sub else 0.05) else rng.integers(0, 2)
            feats.append(protos[t] + 0.5 * rng.normal(size=16))
            pids.append(f"P{p}")
            labels.append(["AML_A", "AML_B"][sub])
    res = evaluate_mil(np.array(feats, np.float32), pids, labels, MILConfig(epochs=15, folds=4))
    assert res["patients"] == 24 and res["folds"] == 4 and res["cells"] == 720
    assert res["balanced_accuracy"] >= 0.85, res


def test_probe_recipe_on_ray_with_feature_cache(ray_local, tmp_path):
    from cytoray.eval import probe
    from cytoray.testing import write_cell_manifest

    manifest = write_cell_manifest(str(tmp_path / "cells"), 60, seed=5)
    out = tmp_path / "probe"
    args = ["--checkpoint", "random:vit_debug", "--checkpoint", "handcrafted", "--manifest", manifest,
            "--out", str(out), "probe.folds=3", "probe.c_grid=[1.0]", f"probe.cache_dir={tmp_path / 'cache'}",
            "ray.num_cpus=2"]
    results = probe.main(args)
    assert [r["checkpoint"] for r in results] == ["random:vit_debug", "handcrafted"]
    assert all(r["manifest"] == manifest and r["images"] == 60 for r in results)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved) == 2 and all(os.path.exists(r["confusion_png"]) for r in saved)
    assert len(os.listdir(tmp_path / "cache")) == 2
    # handcrafted colour/texture features separate the synthetic classes well
    assert results[1]["methods"]["linear"]["balanced_accuracy"] > 0.6
    # second run: features come from the cache, identical scores
    again = probe.main(args)
    assert again[0]["methods"] == results[0]["methods"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_id": ["a"], "uri": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ProbeError, match="lacks columns \\['cell_type'\\]"):
        probe.main(["--checkpoint", "handcrafted", "--manifest", str(tmp_path / "bad.parquet")])


def test_mil_only_manifest_beats_chance(tmp_path):
    """Patient-labelled cells without cell labels (AML Hehr style): --mil runs ABMIL only, k-fold by patient."""
    from cytoray.eval import probe
    from cytoray.testing import write_patient_manifest

    manifest = write_patient_manifest(str(tmp_path / "patients"), patients=20, cells_per_patient=16, seed=3)
    out = tmp_path / "probe"
    args = ["--checkpoint", "handcrafted", "--manifest", manifest, "--out", str(out), "probe.num_actors=0",
            "probe.mil_folds=4", "probe.mil_epochs=30"]
    with pytest.raises(ProbeError, match="lacks columns \\['cell_type'\\]"):  # cell probe needs cell labels
        probe.main(args)
    results = probe.main(["--mil", *args])
    (r,) = results
    assert r["methods"] == {} and r["mil"]["patients"] == 20 and r["mil"]["cells"] == 320
    assert r["mil"]["folds"] == 4 and r["mil"]["chance_balanced_accuracy"] == pytest.approx(0.2)
    assert r["mil"]["balanced_accuracy"] >= 0.6, r["mil"]  # 5 subtypes: chance is 0.2
    assert "ABMIL" in probe.results_table(results)
    assert json.loads((out / "results.json").read_text())[0]["mil"]["patients"] == 20


def test_results_table_names_each_held_out_site_in_full():
    """Per-site rows keep the whole site name: sites that share a prefix (hospital_berlin, hospital_munich) stay
    two distinguishable rows, not two 'linear:hospita' rows."""
    from cytoray.eval.probe import results_table
    from cytoray.eval.protocols import CrossSiteConfig

    rng = np.random.default_rng(0)
    sites = ["hospital_berlin", "hospital_munich", "site_c"]
    x = rng.normal(size=(90, 8)).astype(np.float32)
    y, s = [f"c{i % 3}" for i in range(90)], [sites[(i // 3) % 3] for i in range(90)]
    cfg = ProbeConfig(c_grid=[1.0], knn_k=[5], knn_weighted_k=5, methods=["linear"],
                      cross_site=CrossSiteConfig(protocol="leave_one_dataset_out", robustness_k=0))
    res = score_features(x, y, None, cfg, s) | {"checkpoint": "c", "manifest": "m/manifest.parquet"}
    labels = [line.split()[3] for line in results_table([res]).splitlines() if " LODO " in line]
    assert labels == ["linear", *(f"linear:{site}" for site in sites)]


def test_small_fits_run_on_one_thread_and_restore_the_limits():
    """A demo-sized fit runs on one BLAS / OpenMP thread (thread start-up dominates on small matrices); the limits
    are scoped, and a large fit keeps the libraries' threads."""
    import sklearn.linear_model  # noqa: F401 - loads the BLAS and OpenMP runtimes threadpoolctl reports
    from threadpoolctl import threadpool_info

    from cytoray.eval.methods import SMALL_FIT_VALUES, fit_threads

    before = [d["num_threads"] for d in threadpool_info()]
    with fit_threads(np.zeros((300, 64), np.float32)):
        assert all(d["num_threads"] == 1 for d in threadpool_info())
    assert [d["num_threads"] for d in threadpool_info()] == before
    with fit_threads(np.zeros(SMALL_FIT_VALUES, np.float32)):
        assert [d["num_threads"] for d in threadpool_info()] == before
