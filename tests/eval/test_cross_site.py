"""Cross-site probing: folds split by site exactly (cells and whole patients), clear errors for missing sites, the
Robustness Index on features that encode only the site or only the class, the cross-site headline."""

import numpy as np
import pytest

from cytoray.eval import mil
from cytoray.eval.methods import METHODS
from cytoray.eval.metrics import ProbeError
from cytoray.eval.probe import ProbeConfig, results_table, score_features
from cytoray.eval.protocols import CrossSiteConfig, check_settings, robustness_index, site_folds

SITES = ["s0", "s1", "s2", "s3"]
CLASSES = ["c0", "c1", "c2", "c3"]


def _sited(n=8, dim=16, class_sep=3.0, site_sep=0.0, seed=0):
    """n images per (site, class): features = class centre * class_sep + site centre * site_sep + noise."""
    rng = np.random.default_rng(seed)
    cc, sc = rng.normal(size=(len(CLASSES), dim)), rng.normal(size=(len(SITES), dim))
    x, y, s = [], [], []
    for i, site in enumerate(SITES):
        for j, cls in enumerate(CLASSES):
            x.append(class_sep * cc[j] + site_sep * sc[i] + rng.normal(size=(n, dim)))
            y += [cls] * n
            s += [site] * n
    x = np.concatenate(x).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), y, s


def _spy(calls):
    """A registered method that records which rows (the index in feature column 0) each fold trains and tests on."""
    def spy(x_tr, y_tr, x_te, n_classes, cfg, info):
        calls.append((x_tr[:, 0].round().astype(int).tolist(), x_te[:, 0].round().astype(int).tolist()))
        return {"spy": np.zeros(len(x_te), int)}
    return spy


def test_cross_site_folds_split_by_site_exactly(monkeypatch):
    x, y, s = _sited()
    rows = np.c_[np.arange(len(x)), x].astype(np.float32)  # column 0: the row index
    calls = []
    monkeypatch.setitem(METHODS, "spy", _spy(calls))
    sites = np.array(s, dtype=object)
    cfg = ProbeConfig(methods=["spy"], cross_site=CrossSiteConfig(protocol="leave_one_dataset_out"))
    res = score_features(rows, y, None, cfg, s)["cross_site"]
    in_site = calls[:5]  # the in-site k-fold runs first, as before
    assert len(in_site) == 5 and all(set(sites[tr]) == set(SITES) for tr, _ in in_site)
    assert [f["test"] for f in res["folds"]] == [[site] for site in SITES]
    for (tr, te), fold in zip(calls[5:], res["folds"]):
        held = fold["test"][0]
        assert set(sites[te]) == {held} and held not in set(sites[tr])  # no site on both sides
        assert len(te) == s.count(held) and len(tr) + len(te) == len(x)  # every row of the site, all others train
    assert set(res["methods"]["spy"]["per_site"]) == set(SITES) and res["images"] == {site: 32 for site in SITES}

    calls.clear()
    cfg.cross_site = CrossSiteConfig(protocol="explicit", train_datasets=["s0", "s1"], test_datasets=["s3"])
    res = score_features(rows, y, None, cfg, s)["cross_site"]
    tr, te = calls[-1]
    assert set(sites[tr]) == {"s0", "s1"} and set(sites[te]) == {"s3"} and list(res["images"]) == ["s3"]
    cfg.cross_site.test_datasets = []  # default: every site not trained on, each scored on its own
    res = score_features(rows, y, None, cfg, s)["cross_site"]
    assert set(sites[calls[-1][1]]) == {"s2", "s3"} and set(res["methods"]["spy"]["per_site"]) == {"s2", "s3"}


def test_cross_site_scores_transfer_of_class_features_not_site_features():
    cfg = ProbeConfig(c_grid=[1.0], knn_k=[5], knn_weighted_k=5, cross_site=CrossSiteConfig(protocol="leave_one_dataset_out"))
    x, y, s = _sited(class_sep=3.0)
    res = score_features(x, y, None, cfg, s)
    assert res["methods"]["linear"]["balanced_accuracy"] > 0.9  # in-site, as before
    for m in res["cross_site"]["methods"].values():
        assert m["mean"]["balanced_accuracy"] > 0.9
        assert m["mean"]["balanced_accuracy"] == pytest.approx(np.mean([v["balanced_accuracy"] for v in m["per_site"].values()]))
    ri = res["robustness"]
    assert ri["biology_share"] > 0.75 and (ri["robustness_index"] is None or ri["robustness_index"] > 3.0)
    assert "LODO" in results_table([{**res, "checkpoint": "c", "manifest": "m/x.parquet"}])
    x, y, s = _sited(class_sep=0.0, site_sep=3.0)  # features of the site alone
    res = score_features(x, y, None, cfg, s)
    assert res["cross_site"]["methods"]["linear"]["mean"]["balanced_accuracy"] < 0.45  # 4 classes: chance 0.25
    assert res["robustness"]["robustness_index"] < 0.4 and res["robustness"]["biology_share"] < 0.3
    # without a cross-site protocol the result is today's in-site one (plus the RI of a multi-site manifest)
    plain = score_features(x, y, None, ProbeConfig(c_grid=[1.0], knn_k=[5], knn_weighted_k=5), s)
    assert "cross_site" not in plain and plain["methods"] == res["methods"]


def test_robustness_index_counts_neighbour_types():
    # two sites x two classes on a line: each image's 1-NN is the same-class image of the other site: no OS
    # neighbour, so SO / OS is undefined (None, not inf) and the share is 1
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], np.float32)
    y, s = np.array([0, 0, 1, 1]), np.array(["a", "b", "a", "b"], dtype=object)
    r = robustness_index(x, y, s, 1)
    assert r["same_class_other_site"] == 4 and r["other_class_same_site"] == 0
    assert r["robustness_index"] is None and r["biology_share"] == 1.0
    r = robustness_index(x, np.array([0, 1, 1, 0]), s, 1)  # now the 1-NN is another class at another site
    assert r["other_class_other_site"] == 4 and r["robustness_index"] is None and r["biology_share"] is None
    r = robustness_index(x, y, np.array(["a", "a", "b", "b"], dtype=object), 3)
    assert (r["same_class_other_site"], r["other_class_same_site"], r["same_class_same_site"]) == (0, 0, 4)


def test_undefined_robustness_index_keeps_results_valid_json():
    """An undefined ratio reaches results.json as null, Ray metrics without the key, the table as '-'."""
    import json

    from cytoray.eval import validation

    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1]], np.float32)
    res = {"methods": {}, "images": 4, "checkpoint": "c", "manifest": "m/manifest.parquet",
           "robustness": robustness_index(x, np.array([0, 0, 1, 1]), np.array(["a", "b", "a", "b"], object), 1)}
    text = json.dumps([res], allow_nan=False)  # raises on inf / NaN
    assert json.loads(text)[0]["robustness"]["robustness_index"] is None
    flat = validation.flat_metrics([res], ["eval"])
    assert "probe/eval/robustness_index" not in flat and flat["probe/eval/biology_share"] == 1.0
    assert results_table([res]).splitlines()[-1].split()[-2:] == ["-", "1.000"]


def test_missing_sites_and_bad_settings_are_one_line_errors():
    sites = np.array(["s0", "s1", None], dtype=object)
    with pytest.raises(ProbeError, match=r"sites \['s9'\] are not in column 'dataset' of m.parquet; "
                                         r"sites present: \['s0', 's1'\]"):
        site_folds(sites, CrossSiteConfig(protocol="explicit", train_datasets=["s0"], test_datasets=["s9"]),
                   "m.parquet")
    with pytest.raises(ProbeError, match=r"needs >= 2 sites in column 'hospital' of the manifest; found \['s0'\]"):
        site_folds(np.array(["s0", "s0"], dtype=object),
                   CrossSiteConfig(protocol="leave_one_dataset_out", site_column="hospital"))
    with pytest.raises(ProbeError, match="leaves no site"):
        site_folds(sites, CrossSiteConfig(protocol="explicit", train_datasets=["s0", "s1"]))
    with pytest.raises(ProbeError, match="did you mean 'leave_one_dataset_out'"):
        check_settings(CrossSiteConfig(protocol="leave_one_out"), "in_site")
    with pytest.raises(ProbeError, match="headline=cross_site needs a cross-site protocol"):
        check_settings(CrossSiteConfig(), "cross_site")
    with pytest.raises(ProbeError, match="in both train_datasets and test_datasets"):
        check_settings(CrossSiteConfig(protocol="explicit", train_datasets=["a"], test_datasets=["a"]), "in_site")
    with pytest.raises(ProbeError, match="did you mean 'cross_site'"):
        check_settings(CrossSiteConfig(), "crosssite")


def test_abmil_cross_site_splits_whole_patients(monkeypatch):
    rng = np.random.default_rng(0)
    pids, labels, sites = [], [], []
    for p in range(12):  # 3 sites x 4 patients, 2 labels per site; 5 cells each
        pids += [f"P{p}"] * 5
        labels += [["AML_A", "AML_B"][p % 2]] * 5
        sites += [SITES[p % 3]] * 5
    feats = np.c_[np.arange(len(pids)), rng.normal(size=(len(pids), 4))].astype(np.float32)
    seen = []

    def fake(bags_tr, y_tr, bags_te, n_classes, cfg):
        seen.append(([b[:, 0].astype(int).tolist() for b in bags_tr], [b[:, 0].astype(int).tolist() for b in bags_te]))
        return np.zeros(len(bags_te), int)

    monkeypatch.setattr(mil, "train_and_predict", fake)
    site_of = np.array(sites, dtype=object)
    res = mil.evaluate_mil_cross_site(feats, pids, labels, site_of, CrossSiteConfig(protocol="leave_one_dataset_out"),
                                      mil.MILConfig())
    assert len(seen) == 3 and set(res["per_site"]) == {"s0", "s1", "s2"}
    for (tr, te), fold in zip(seen, res["folds"]):
        for bag in tr + te:  # every bag is one whole patient
            assert len(bag) == 5 and len({pids[i] for i in bag}) == 1
        assert {site_of[i] for b in te for i in b} == set(fold["test"])
        assert not {site_of[i] for b in tr for i in b} & set(fold["test"])
        assert fold["train_patients"] == 8 and fold["test_patients"] == 4
    assert res["mean"]["balanced_accuracy"] == pytest.approx(0.5)  # always AML_A: chance on each site
    with pytest.raises(ProbeError, match="patient 'P0' has cells from sites"):
        mil.evaluate_mil_cross_site(feats, pids, labels, np.array(["s9"] + sites[1:], dtype=object),
                                    CrossSiteConfig(protocol="leave_one_dataset_out"), mil.MILConfig())


def test_headline_picks_probe_score():
    from cytoray.config import ConfigError
    from cytoray.eval import validation

    x, y, s = _sited()
    cfg = ProbeConfig(c_grid=[1.0], methods=["linear"], cross_site=CrossSiteConfig(protocol="leave_one_dataset_out"))
    res = score_features(x, y, None, cfg, s) | {"images": len(x)}
    in_site = validation.flat_metrics([res], ["eval"])
    cross = validation.flat_metrics([res], ["eval"], "cross_site")
    assert in_site[validation.SCORE] == res["methods"]["linear"]["balanced_accuracy"]
    assert cross[validation.SCORE] == res["cross_site"]["methods"]["linear"]["mean"]["balanced_accuracy"]
    assert cross["probe/eval/cross_site/linear/balanced_accuracy"] == cross[validation.SCORE]
    assert cross["probe/eval/biology_share"] == res["robustness"]["biology_share"]
    rows = validation.table_rows(100, "ckpt", [res], ["eval"])
    assert {r["method"] for r in rows} == {"linear", "cross_site/linear", *(f"cross_site/linear/{x}" for x in SITES)}
    assert "eval:cross_site/linear" in validation.format_results_table(rows)
    with pytest.raises(ConfigError, match="eval.probe.headline=cross_site needs a cross-site protocol: set "
                                          "eval.probe.cross_site.protocol"):
        validation.check_settings_for_training(ProbeConfig(headline="cross_site"))


def test_site_manifest_spans_sites_that_differ_physically(tmp_path):
    import pyarrow.parquet as pq

    from cytoray.curation.synthetic.sites import SITES, render_site_cell
    from cytoray.testing import write_site_manifest

    t = pq.read_table(write_site_manifest(str(tmp_path / "sites"), 40, seed=3)).to_pydict()
    assert sorted(set(t["dataset"])) == sorted(SITES) and len(set(t["cell_type"])) == 10
    assert all(t["dataset"].count(site) == 10 for site in SITES)  # every site shows every class once here

    def stats(site):
        rng = np.random.default_rng(0)
        ims = np.stack([render_site_cell("lymphocyte", 64, SITES[site], rng) for _ in range(6)]).astype(np.float64)
        lap = np.abs(4 * ims[:, 1:-1, 1:-1] - ims[:, :-2, 1:-1] - ims[:, 2:, 1:-1] - ims[:, 1:-1, :-2]
                      - ims[:, 1:-1, 2:]).mean()
        return ims.mean((0, 1, 2)), lap

    (a, sharp_a), (b, _), (_, sharp_d) = stats("site_a"), stats("site_b"), stats("site_d")
    assert a[2] < a[0] - 15 and b[2] > b[0] + 5  # halogen: warm (less blue); LED: cool
    assert sharp_d < 0.7 * sharp_a  # site_d's wider point-spread function
    assert SITES["site_c"].um_per_px > SITES["site_d"].um_per_px  # coarser pixels: cells span fewer of them


def test_cross_site_probe_on_synthetic_site_images(tmp_path):
    """The whole path on images: a manifest of four synthetic sites, handcrafted features extracted in-process,
    leave-one-dataset-out for the cell probe and ABMIL (patients seen at three sites), the printed table."""
    from cytoray.config import ConfigError
    from cytoray.eval import validation
    from cytoray.eval.probe import evaluate
    from cytoray.testing import write_patient_manifest, write_site_manifest

    cells = write_site_manifest(str(tmp_path / "cells"), 48, seed=5)
    patients = write_patient_manifest(str(tmp_path / "patients"), patients=10, cells_per_patient=4, seed=5,
                                      sites=["site_a", "site_b"])
    cfg = ProbeConfig(num_actors=0, folds=3, c_grid=[1.0], knn_k=[5], knn_weighted_k=5, mil=True, mil_folds=2,
                      mil_epochs=3, cross_site=CrossSiteConfig(protocol="leave_one_dataset_out", robustness_k=5))
    cell_res, patient_res = evaluate("handcrafted", [cells, patients], cfg)
    assert cell_res["protocol"] == "kfold" and set(cell_res["methods"]) == {"linear", "knn5", "knn5_T0.07"}
    assert list(cell_res["cross_site"]["images"]) == ["site_a", "site_b", "site_c", "site_d"]
    assert all(n == 12 for n in cell_res["cross_site"]["images"].values())
    assert cell_res["robustness"]["sites"] == 4 and cell_res["robustness"]["images"] == 48
    mil_x = patient_res["mil"]["cross_site"]
    assert set(mil_x["per_site"]) == {"site_a", "site_b"} and mil_x["patients"] == 10
    table = results_table([cell_res, patient_res])
    assert "LODO     linear:site_a" in table and "LODO     ABMIL:site_b" in table and "Robustness Index" in table
    with pytest.raises(ConfigError, match=r"sites \['site_x'\] are not in column 'dataset' of .*cells/manifest.parquet; "
                                          r"sites present: \['site_a', 'site_b', 'site_c', 'site_d'\]"):
        validation.check(validation.EvalConfig(manifests=[cells], probe=ProbeConfig(
            cross_site=CrossSiteConfig(protocol="explicit", train_datasets=["site_a"], test_datasets=["site_x"]))))
    # the recipe: one-line errors before Ray starts or any feature is extracted
    from cytoray.eval import probe

    args = ["--checkpoint", "handcrafted", "--manifest", cells]
    with pytest.raises(ProbeError, match=r"sites \['site_x'\] are not in column 'dataset'"):
        probe.main([*args, "probe.cross_site.protocol=explicit", "probe.cross_site.train_datasets=[site_x]"])
    with pytest.raises(ConfigError, match="did you mean 'probe.cross_site.protocol'"):
        probe.main([*args, "probe.cross_site.protocl=explicit"])
