"""The augmentation sweep: Ray Tune over short Ray Train pretraining runs on 2 CPUs, ASHA on the probe score."""

import csv
import os

import pytest

from cytoray.config import ConfigError
from cytoray.platform import sweep
from cytoray.platform.config import load_pretrain_config
from cytoray.testing import write_cell_manifest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = ["--config", os.path.join(REPO, "recipes", "configs", "cpu_debug.yaml"),
           "--config", os.path.join(REPO, "recipes", "configs", "sweep_cpu.yaml")]


def test_two_trials_on_two_cpus_write_table_plot_and_best_config(ray_local, tmp_path):
    import ray

    cells = write_cell_manifest(str(tmp_path / "cells"), 40, seed=1)
    heldout = write_cell_manifest(str(tmp_path / "heldout"), 60, seed=7)
    args = [*CONFIGS, f"data.manifest_uri={cells}", f"eval.manifests=[{heldout}]",
            f"sweep.storage_path={tmp_path / 'sweeps'}", "model.total_iters=8", "sweep.rungs=[4,8]"]
    summary = sweep.main(args, preset="debug")
    assert "TUNE_DISABLE_STRICT_METRIC_CHECKING" not in os.environ  # set for the sweep only

    out = tmp_path / "sweeps" / "sweep_cpu"
    assert summary["trials"] == 2 and summary["completed"] == 2
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(r["stain"]) for r in rows) == [0.0, 0.05]  # the grid: one trial per setting
    assert all(not r["error"] and r["steps"] in ("4", "8") for r in rows)
    assert any(r["steps"] == "8" for r in rows)  # ASHA lets the better trial reach the last rung
    for r in rows:  # each trial's score is its own run's probe of that step
        trial_csv = tmp_path / "sweeps" / "sweep_cpu" / "trials" / f"trial_{r['trial']}" / "eval" / "results.csv"
        with open(trial_csv) as f:
            linear = {int(x["step"]): float(x["balanced_accuracy"]) for x in csv.DictReader(f)
                      if x["method"] == "linear"}
        assert float(r["probe_score"]) == pytest.approx(linear[int(r["steps"])], abs=1e-5)
        assert 0.2 < float(r["probe_score"]) <= 1.0
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing left behind: every placement group of the trials' training jobs is removed
    assert {pg["state"] for pg in ray.util.placement_group_table().values()} <= {"REMOVED"}

    # the best config is an override file that pretraining takes as it is
    best = max((r for r in rows if r["steps"] == "8"), key=lambda r: float(r["probe_score"]))
    assert summary["best_trial"] == best["trial"]
    cfg = load_pretrain_config(["--config", summary["best_overrides"], "data.manifest_uri=x", "run.name=y"],
                               preset="debug")
    assert cfg.model.augment.hed_p == (0.5 if float(best["stain"]) > 0 else 0.0)


def test_sweep_settings_are_checked_before_any_trial(ray_local, tmp_path):
    base = [*CONFIGS, "data.manifest_uri=x", f"sweep.storage_path={tmp_path}"]

    def load(*extra):
        cfg = load_pretrain_config(["run.name=unused", *base, *extra], "debug", schema=sweep.SweepRunConfig)
        return sweep.check(cfg, {"CPU": 2.0})

    assert load("eval.manifests=[m]") == 2  # 0.95 CPU per trial: two at a time on 2 CPUs
    assert load("eval.manifests=[m]", "train.num_workers=2") == 1
    with pytest.raises(ConfigError, match="set eval.manifests"):
        load()
    with pytest.raises(ConfigError, match="one trial needs 2.9 CPU .* the cluster has 2"):
        load("eval.manifests=[m]", "train.num_workers=4")
    with pytest.raises(ConfigError, match="unknown knob 'blur'"):
        load("eval.manifests=[m]", "sweep.knobs=[blur]")
    with pytest.raises(ConfigError, match="rotation_flip value 'spin'"):
        load("eval.manifests=[m]", "sweep.knobs=[rotation_flip]", "sweep.space.rotation_flip=[spin]")
    with pytest.raises(ConfigError, match="must be increasing"):
        load("eval.manifests=[m]", "sweep.rungs=[20,10]")
    with pytest.raises(ConfigError, match="model.total_iters=40"):
        load("eval.manifests=[m]", "sweep.rungs=[20,80]")
    with pytest.raises(ConfigError, match="schedule_to_max_steps=true would give each rung"):
        load("eval.manifests=[m]", "train.schedule_to_max_steps=true")


def _sleepy_trial(config):
    import time

    import ray.tune

    start = time.time()
    time.sleep(1.5)
    ray.tune.report({"step": 20, "probe_score": config["stain"], "start": start, "end": time.time()})


def test_tuner_runs_at_most_the_checked_number_of_trials_at_once(ray_local, tmp_path):
    from ray import tune

    s = sweep.SweepConfig(knobs=["stain"], rungs=[20], name="cap", num_samples=1)
    trainable = tune.with_resources(_sleepy_trial, {"CPU": 0.05})  # 4 would fit at once without the cap
    tuner = sweep.make_tuner(trainable, {"stain": tune.grid_search([0.0, 0.02, 0.05, 0.1])}, s, 2,
                             str(tmp_path / "tune"))
    grid = tuner.fit()
    spans = sorted((r.metrics["start"], r.metrics["end"]) for r in grid)
    assert len(spans) == 4 and not grid.errors
    most = max(sum(a < start + 1e-3 < b for a, b in spans) for start, _ in spans)  # running just after each start
    assert most == 2  # two at a time, never four


def test_sweep_accepts_the_cross_site_headline(tmp_path):
    base = ["run.name=unused", *CONFIGS, "data.manifest_uri=x", f"sweep.storage_path={tmp_path}", "eval.manifests=[m]"]

    def load(*extra):
        return sweep.check(load_pretrain_config([*base, *extra], "debug", schema=sweep.SweepRunConfig), {"CPU": 2.0})

    assert load("eval.probe.headline=cross_site", "eval.probe.cross_site.protocol=leave_one_dataset_out") == 2
    with pytest.raises(ConfigError, match="eval.probe.headline=cross_site needs a cross-site protocol"):
        load("eval.probe.headline=cross_site")
    with pytest.raises(ConfigError, match="did you mean 'eval.probe.headline'"):
        load("eval.probe.headlines=cross_site")


def test_sweep_checks_the_cross_site_sites_before_ray_starts(tmp_path, monkeypatch):
    """A site the labelled manifest lacks stops the sweep in one line before Ray starts (not in every trial)."""
    import cytoray.runtime
    from cytoray.testing import write_site_manifest

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the manifests were checked")

    monkeypatch.setattr(cytoray.runtime, "init_ray", no_ray)
    sites = write_site_manifest(str(tmp_path / "sites"), 8, seed=0, size=32)
    args = [*CONFIGS, "data.manifest_uri=x", f"eval.manifests=[{sites}]", f"sweep.storage_path={tmp_path}",
            "eval.probe.headline=cross_site", "eval.probe.cross_site.protocol=explicit",
            "eval.probe.cross_site.train_datasets=[site_x]"]
    with pytest.raises(ConfigError, match=r"^eval.manifests: probe.cross_site: sites \['site_x'\] are not in column "
                                          r"'dataset' of .*sites/manifest.parquet; sites present: \['site_a'"):
        sweep.main(args, preset="debug")
