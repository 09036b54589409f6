"""MLflow tracking against a real local SQLite store: one MLflow run per cytoray run (found again by its tag),
flattened params, one metric batch per log step, probe scores and artifacts at the end, clear start-up errors."""

import json
import logging
import os
import sys

import pytest

from cytoray.config import ConfigError
from cytoray.eval import validation
from cytoray.platform.tracking import MetricsSender, TrackingConfig, check, finish_run, start_run
from cytoray.runtime import free_port

CONFIG = {"preset": "debug", "model": {"vit": {"arch": "vit_debug", "patch_size": 8}, "total_iters": 10},
          "eval": {"manifests": ["/data/heldout.parquet"], "probe": {}},
          "storage": {"secret_access_key": "s3cr3t", "endpoint_url": None}, "note": "x" * 7000}


@pytest.fixture
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(mlflow=True, mlflow_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", experiment="tests")
    return cfg, MlflowClient(cfg.mlflow_uri)


def test_a_run_is_created_once_then_reused_by_its_run_uri(store, tmp_path):
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    cfg, client = store
    spec = start_run(cfg, "/runs/a", "a", CONFIG)
    assert spec == {"uri": cfg.mlflow_uri, "run_id": spec["run_id"]}
    params = client.get_run(spec["run_id"]).data.params
    assert params["model.vit.arch"] == "vit_debug" and params["model.total_iters"] == "10"
    assert params["eval.manifests"] == "['/data/heldout.parquet']" and params["eval.probe"] == "{}"
    assert params["storage.secret_access_key"] == "***" and params["storage.endpoint_url"] == "None"
    assert len(params["note"]) == MAX_PARAM_VAL_LENGTH and params["note"].endswith("...")
    # a resumed run continues the same MLflow run: new keys are added, logged values stay (params are write-once)
    again = start_run(cfg, "/runs/a", "a", {**CONFIG, "model": {"vit": {"arch": "vit_small"}}, "extra": 1})
    assert again == spec
    params = client.get_run(spec["run_id"]).data.params
    assert params["model.vit.arch"] == "vit_debug" and params["extra"] == "1"
    assert client.get_run(spec["run_id"]).info.status == "RUNNING"
    other = start_run(cfg, "/runs/b", "b", CONFIG)  # another cytoray run: another MLflow run
    assert other["run_id"] != spec["run_id"]
    assert start_run(TrackingConfig(), "/runs/a", "a", CONFIG) is None  # tracking off


def test_rank_zero_logs_one_batch_per_log_step_and_a_restart_skips_logged_steps(store):
    cfg, client = store
    spec = start_run(cfg, "/runs/a", "a", {})
    sender = MetricsSender(spec)
    for step in (4, 9):
        sender.log(step, {"loss": 10.0 - step, "lr": 1e-3, "images_per_s": 50.0})
    sender.close()
    history = client.get_metric_history(spec["run_id"], "loss")
    assert [(m.step, m.value) for m in history] == [(4, 6.0), (9, 1.0)]
    assert {m.timestamp for m in history} == {m.timestamp for m in client.get_metric_history(spec["run_id"], "lr")}
    # restarted from an earlier checkpoint: steps up to 9 were logged before and are skipped
    sender = MetricsSender(spec)
    for step in (9, 14):
        sender.log(step, {"loss": 0.5, "lr": 1e-3})
    sender.close()
    assert [m.step for m in client.get_metric_history(spec["run_id"], "loss")] == [4, 9, 14]


def test_a_failing_store_during_training_warns_once_and_loses_nothing_else(caplog):
    sender = MetricsSender({"uri": "unknown-scheme://nowhere", "run_id": "0"})
    with caplog.at_level(logging.WARNING, logger="cytoray.platform.tracking"):
        for step in range(3):
            sender.log(step, {"loss": 1.0})
        sender.close()
    warnings = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "training goes on, metrics.csv has every row" in warnings[0]


def test_the_end_of_a_run_logs_probe_scores_artifacts_and_status(store, tmp_path):
    cfg, client = store
    run, curation = tmp_path / "runs" / "a", tmp_path / "curate"
    for path, text in ((run / "config.yaml", "preset: debug\n"), (run / "training.html", "<html></html>"),
                       (run / "exports" / "final" / "hf" / "README.md", "# model card\n"),
                       (curation / "report.html", "<html>curation</html>")):
        os.makedirs(path.parent, exist_ok=True)
        path.write_text(text)
    for step, acc in ((4, 0.5), (8, 0.75)):
        m = {"accuracy": acc, "balanced_accuracy": acc - 0.1, "weighted_f1": acc}
        rows = validation.table_rows(step, f"{run}/checkpoint_{step:08d}", [{"images": 9, "methods": {"linear": m}}],
                                     ["heldout"])
        os.makedirs(run / "eval", exist_ok=True)
        (run / "eval" / f"checkpoint_{step:08d}.json").write_text(json.dumps({"rows": rows}))
    validation.write_results_table(str(run))

    spec = start_run(cfg, str(run), "a", {})
    finish_run(spec, str(run), str(curation / "manifest.parquet"))
    finish_run(spec, str(run), str(curation / "manifest.parquet"))  # a relaunch adds no second point per step
    history = client.get_metric_history(spec["run_id"], "probe/heldout/linear/balanced_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(4, 0.4), (8, 0.65)]
    assert len(client.get_metric_history(spec["run_id"], "probe/heldout/linear/weighted_f1")) == 2
    assert client.get_run(spec["run_id"]).info.artifact_uri.startswith(f"{tmp_path}/mlruns/tests/")
    names = {a.path for a in client.list_artifacts(spec["run_id"])}
    assert names == {"config.yaml", "training.html", "model", "curation"}
    assert [a.path for a in client.list_artifacts(spec["run_id"], "model/hf")] == ["model/hf/README.md"]
    assert [a.path for a in client.list_artifacts(spec["run_id"], "curation")] == ["curation/report.html"]
    assert client.get_run(spec["run_id"]).info.status == "FINISHED"


def test_a_bad_store_or_a_missing_package_fails_at_start_up_in_one_line(tmp_path, monkeypatch):
    check(TrackingConfig(mlflow_uri="unknown-scheme://nowhere"))  # tracking off: nothing is checked
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri='unknown-scheme://nowhere': the MLflow store "
                                          r"cannot be used: .*unsupported URI"):
        check(TrackingConfig(mlflow=True, mlflow_uri="unknown-scheme://nowhere"))
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri='http://127.0.0.1:\d+': no MLflow server answers"):
        check(TrackingConfig(mlflow=True, mlflow_uri=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ConfigError, match="maintenance mode"):  # MLflow 3 refuses the plain-file store
        check(TrackingConfig(mlflow=True, mlflow_uri=f"file://{tmp_path}/mlruns"))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs the mlflow package: pip install 'cytoray\[tracking\]'"):
        check(TrackingConfig(mlflow=True, mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert not os.path.exists(tmp_path / "mlflow.db")


def test_the_default_store_is_sqlite_under_the_working_directory(tmp_path, monkeypatch):
    from cytoray.platform.tracking import store_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store_uri(TrackingConfig(mlflow=True)) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    spec = start_run(TrackingConfig(mlflow=True), "/runs/a", "a", {})
    from mlflow.tracking import MlflowClient

    run = MlflowClient(spec["uri"]).get_run(spec["run_id"])
    assert run.info.artifact_uri == f"{tmp_path}/mlruns/cytoray/{spec['run_id']}/artifacts"  # beside the database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert store_uri(TrackingConfig(mlflow=True)) == "http://tracking.example:5000"
