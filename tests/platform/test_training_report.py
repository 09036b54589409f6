"""training.html from the files a run writes (MetricsLog's metrics.csv, the validation's eval/results.csv), opened
in headless Chromium; a missing or malformed metrics.csv still gives a page."""

import json
import logging
import os
import re

from cytoray import config as config_lib
from cytoray.eval import validation
from cytoray.platform.config import PretrainConfig
from cytoray.platform.metrics import MetricsLog
from cytoray.platform.training_report import write_training_report
from cytoray.testing import rendered_dom

LOSSES = ("loss", "dino_local_loss", "dino_global_loss", "ibot_loss", "koleo_loss")


def _write_run(run, steps=40, probe_steps=(20, 40)):
    """A run directory as a 2-worker debug run leaves it: config.yaml, metrics.csv, eval/ (via the real writers)."""
    cfg = PretrainConfig(preset="debug")
    cfg.run.name, cfg.train.num_workers, cfg.model.vit.arch, cfg.model.total_iters = "tiny", 2, "vit_debug", steps
    config_lib.save_config(cfg, str(run))
    metrics = MetricsLog(str(run), 0)
    for step in range(steps):
        row = {k: 10.0 / (1 + step) + i for i, k in enumerate(LOSSES)}
        row.update(teacher_entropy=5.0, student_feature_std=0.1, grad_norm=5.0, grad_norm_backbone=3.0,
                   grad_norm_dino_head=4.0, grad_clipped_backbone=0.0, grad_clipped_dino_head=1.0,
                   lr=1e-3 * step / steps, wd=0.04,
                   momentum=0.99, teacher_temp=0.07, images_per_s=100.0 + step, step_time_s=0.5, data_wait_s=0.05,
                   data_wait_frac=0.1)
        metrics.log(step, row)
    metrics.close()
    for step in probe_steps:
        m = {"accuracy": 0.5 + step / 100, "balanced_accuracy": 0.4 + step / 100, "weighted_f1": 0.45}
        site = {**m, "balanced_accuracy": 0.2 + step / 100}
        results = [{"images": 60, "methods": {"linear": m, "knn20": {**m, "balanced_accuracy": 0.3}},
                    "cross_site": {"images": {"s1": 30, "s2": 30}, "methods": {"linear": {
                        "mean": site, "per_site": {"s1": site, "s2": site}}}},
                    "robustness": {"k": 20, "robustness_index": None if step == 20 else 0.5, "biology_share":
                                   1.0 if step == 20 else 1 / 3}}]
        rows = validation.table_rows(step, f"{run}/checkpoint_{step:08d}", results, ["heldout"])
        os.makedirs(run / "eval", exist_ok=True)
        (run / "eval" / f"checkpoint_{step:08d}.json").write_text(json.dumps(
            {"step": step, "manifests": {"heldout": "h.parquet"}, "rows": rows, "results": results}))
    if probe_steps:
        validation.write_results_table(str(run))


def _render(path):
    html = path.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained
    dom = rendered_dom(str(path))
    m = re.search(r'data-loaded="(\d+)" data-total="(\d+)"', dom)
    assert m, "the page's load script did not run"
    return dom, int(m.group(1)), int(m.group(2))


def test_training_report_shows_losses_schedules_throughput_and_probe(tmp_path):
    run = tmp_path / "tiny"
    _write_run(run)
    uri = write_training_report(str(run))
    assert uri == str(run / "training.html")
    dom, loaded, total = _render(run / "training.html")
    for section in ("run", "losses", "probe", "collapse", "schedules", "gradients", "throughput", "other"):
        assert f'<section id="{section}">' in dom, section
    assert loaded == total == 6  # losses, probe, collapse, schedules, gradients, throughput: all decoded
    assert "no other metrics in metrics.csv" in dom  # the collapse monitors have their own section
    assert "<td>grad norm: backbone</td><td>3</td>" in dom and "<td>clipped (1) or not (0): dino_head</td>" in dom
    assert "cytoray training: tiny" in dom and "vit_debug" in dom and "40 of 40" in dom
    for name in LOSSES + ("learning rate", "teacher temperature", "images / s",
                          "teacher target entropy (nats; log K: uniform)", "student CLS std (normalised)"):
        assert f"<td>{name}</td>" in dom, name
    assert "<td>10</td><td>0.25</td>" in dom  # loss: first (10 / 1), last (10 / 40)
    # probe: balanced accuracy per checkpoint and method
    assert "<th>heldout/linear</th>" in dom and "<td>0.600</td>" in dom and "<td>0.800</td>" in dom
    # the mean over held-out sites beside in-site, not a column per site; the Robustness Index per checkpoint
    assert "<th>heldout/cross_site/linear</th>" in dom and "cross_site/linear/s1" not in dom
    assert "<td>20</td><td>heldout</td><td>20</td><td>-</td><td>1.000</td>" in dom
    assert "<td>40</td><td>heldout</td><td>20</td><td>0.500</td><td>0.333</td>" in dom
    assert "no per-checkpoint probe" not in dom


def test_training_report_without_probe_or_with_bad_metrics_still_renders(tmp_path):
    run = tmp_path / "tiny"
    _write_run(run, steps=5, probe_steps=())
    with open(run / "metrics.csv", "a") as f:
        f.write("not-a-step,1,2\n3,abc\n")  # a garbled row and a short one
    write_training_report(str(run))
    dom, loaded, total = _render(run / "training.html")
    assert "no per-checkpoint probe in this run" in dom
    assert "1 malformed rows of" in dom and loaded == total == 5
    assert "5 of 5" in dom
    assert "<td>loss</td><td>10</td><td>nan</td>" in dom  # the short row's missing cells are NaN

    os.remove(run / "metrics.csv")
    os.remove(run / "config.yaml")
    write_training_report(str(run))
    dom, loaded, total = _render(run / "training.html")
    assert "metrics.csv does not exist" in dom and "config.yaml does not exist" in dom
    assert loaded == total == 0 and "no loss values in metrics.csv" in dom

    (run / "config.yaml").write_text("train: [unclosed\n")
    os.makedirs(run / "eval")
    (run / "eval" / "results.csv").write_text("step,what\n4,x\n")
    page = open(write_training_report(str(run))).read()
    assert "config.yaml is not valid yaml" in page and "eval/results.csv of" in page and "is malformed" in page


def test_a_report_that_cannot_be_written_does_not_fail_the_finished_run(tmp_path, caplog):
    from cytoray.platform.train import end_of_run

    (tmp_path / "runs").write_text("a file where the run directory should be")
    cfg = PretrainConfig()
    cfg.run.name, cfg.run.storage_path = "tiny", str(tmp_path / "runs")
    with caplog.at_level(logging.WARNING, logger="cytoray.platform.train"):
        end_of_run(cfg, None, "FINISHED")
    assert f"training.html not written to {tmp_path}/runs/tiny" in caplog.text
