"""Optional MLflow tracking of a pretraining run, beside ``metrics.csv`` and TensorBoard (which stay on).

One cytoray run is one MLflow run, found again by its tag ``cytoray.run_uri``, so a resumed run continues it.

- driver, before the workers start (``start_run``): the experiment, the run (created or reused), the resolved and
  redacted config as params with dotted keys; a missing ``mlflow`` package or an unreachable store fails here
  (``check``), with one line naming ``tracking.mlflow_uri``;
- rank 0 (``MetricsSender``): the ``metrics.csv`` row of every log step (``train.log_every`` and the last step),
  one ``log_batch`` per log step at the step's index, sent from a background thread so training never waits on
  the tracking server; a failing server costs one warning (``metrics.csv`` has every row);
- driver, after ``fit`` (``finish_run``): the probe scores of ``eval/results.csv`` at each checkpoint's step
  (``probe/<manifest>/<method>/<metric>``), the artifacts ``config.yaml``, ``training.html``, the model card
  ``exports/final/<format>/README.md`` and the curation ``report.html`` beside the training manifest when they exist, and
  the run's status.

The default store is SQLite, ``sqlite:///<cwd>/mlruns/mlflow.db``, with artifacts beside the database
(``<cwd>/mlruns/<experiment>/``): MLflow 3 keeps the plain-file store (``./mlruns``, ``file:``) in maintenance
mode and refuses it unless the user sets ``MLFLOW_ALLOW_FILE_STORE=true`` themselves. ``mlflow`` is imported only when tracking is on; its INFO lines
(store creation, migrations) are silenced for the calls that make them, and restored after.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass

from cytoray import storage
from cytoray.config import ConfigError
from cytoray.eval import validation

log = logging.getLogger(__name__)

RUN_TAG = "cytoray.run_uri"
INSTALL = "pip install 'cytoray[tracking]'"
PROBE_METRICS = ("accuracy", "balanced_accuracy", "weighted_f1")


@dataclass
class TrackingConfig:
    """MLflow tracking (off by default; TensorBoard and metrics.csv are always written)."""

    mlflow: bool = False  # params, rank 0's metrics every log step, probe scores, artifacts
    # None: $MLFLOW_TRACKING_URI when set, else sqlite:///<cwd>/mlruns/mlflow.db; or http(s)://host:port (a server
    # every node reaches: on a multi-node cluster rank 0 writes from a worker node), postgresql://..., databricks
    mlflow_uri: str | None = None
    experiment: str = "cytoray"


def store_uri(cfg: TrackingConfig) -> str:
    """The tracking URI the run uses, absolute (workers may run elsewhere, in another directory)."""
    return cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or \
        "sqlite:///" + os.path.join(os.path.abspath("mlruns"), "mlflow.db")


@contextlib.contextmanager
def _quiet():
    """MLflow's and alembic's INFO lines off for one block (the loggers' levels are restored after)."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)


def _connect(cfg: TrackingConfig):
    """(client, experiment id), creating the experiment; a ConfigError naming the key when that fails."""
    try:
        import mlflow  # noqa: F401 - configures MLflow's loggers before _quiet reads their levels
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"tracking.mlflow=true needs the mlflow package: {INSTALL}") from None
    uri = store_uri(cfg)
    _check_reachable(uri)
    # a SQLite store keeps artifacts beside its database (MLflow's default is ./mlruns under whatever directory
    # the experiment happens to be created from); a server or another database keeps MLflow's default
    artifacts = os.path.join(os.path.abspath(os.path.dirname(uri[len("sqlite:///"):])), re.sub(r"[^\w.-]", "_", cfg.experiment)) \
        if uri.startswith("sqlite:///") else None
    try:
        with _quiet():
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(cfg.experiment)
            return client, exp.experiment_id if exp else client.create_experiment(cfg.experiment, artifacts)
    except (MlflowException, OSError) as exc:
        raise ConfigError(f"tracking.mlflow_uri={uri!r}: the MLflow store cannot be used: "
                          f"{str(exc).splitlines()[0][:300]} (give a reachable URI, e.g. sqlite:////abs/mlflow.db "
                          f"or http://host:5000, or set tracking.mlflow=false)") from None


def _check_reachable(uri: str) -> None:
    """An http(s) server answers within seconds (MLflow's own client retries for minutes before it gives up)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10).close()
    except urllib.error.HTTPError:
        pass  # it answered
    except OSError as exc:
        raise ConfigError(f"tracking.mlflow_uri={uri!r}: no MLflow server answers ({exc}); start one "
                          f"(mlflow server ...) or fix the URI") from None


def check(cfg: TrackingConfig) -> None:
    """Pre-flight, before any Ray worker starts: the package is there and the store takes an experiment."""
    if cfg.mlflow:
        _connect(cfg)


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"model.vit.arch": "vit_large", ...}``; values cut to MLflow's length limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        else:
            text = str(value)
            out[name] = text if len(text) <= MAX_PARAM_VAL_LENGTH else text[:MAX_PARAM_VAL_LENGTH - 3] + "..."
    return out


def start_run(cfg: TrackingConfig, run_uri: str, run_name: str, config: dict) -> dict | None:
    """Create the MLflow run of ``run_uri``, or reuse it (a resumed run), and log ``config`` as params.
    Returns what rank 0 needs, ``{"uri", "run_id"}``; None with tracking off."""
    if not cfg.mlflow:
        return None
    from mlflow.entities import Param

    client, experiment_id = _connect(cfg)
    quote = '"' if "'" in run_uri else "'"
    with _quiet():
        found = client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = {quote}{run_uri}{quote}",
                                   max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            run_id, logged = found[0].info.run_id, found[0].data.params
            client.update_run(run_id, status="RUNNING")
        else:
            run_id, logged = client.create_run(experiment_id, tags={RUN_TAG: run_uri}, run_name=run_name).info.run_id, {}
        params = flat_params(storage.redact(config))
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items() if k not in logged])
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:  # MLflow params are write-once; the config.yaml artifact is this launch's
        log.info("MLflow run %s resumed; params changed since its first launch (kept as first logged): %s",
                 run_id, ", ".join(changed))
    log.info("MLflow run %s (%s) in %s, experiment %r", run_id, "resumed" if found else "new", store_uri(cfg),
             cfg.experiment)
    return {"uri": store_uri(cfg), "run_id": run_id}


def artifacts(run_uri: str, manifest_uri: str) -> list[tuple[str, str]]:
    """(URI, artifact folder) of every file ``finish_run`` logs when it exists."""
    curation_dir = posixpath.dirname(manifest_uri.rstrip("/")) or "."
    return [(storage.join_uri(run_uri, "config.yaml"), ""), (storage.join_uri(run_uri, "training.html"), ""),
            *[(storage.join_uri(run_uri, "exports", "final", fmt, "README.md"), f"model/{fmt}")
              for fmt in ("hf", "timm", "dinobloom")],  # the model card of each final export (train.final_export)
            (storage.join_uri(curation_dir, "report.html"), "curation")]


def finish_run(spec: dict, run_uri: str, manifest_uri: str, storage_cfg=None, status: str = "FINISHED") -> None:
    """Probe scores, artifacts and status; a tracking failure here warns (the run directory has it all)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    run_id = spec["run_id"]
    try:
        with _quiet():
            client = MlflowClient(spec["uri"])
            points = {}
            for r in validation.read_results_table(run_uri, storage_cfg):
                for metric in PROBE_METRICS:
                    key = f"probe/{r['manifest']}/{r['method']}/{metric}"
                    points.setdefault(key, {})[int(r["step"])] = float(r[metric])
            now, new = int(time.time() * 1000), []
            for key, by_step in points.items():  # a relaunch logs only the checkpoints not logged before
                logged = {m.step for m in client.get_metric_history(run_id, key)}
                new += [Metric(key, value, now, step) for step, value in sorted(by_step.items()) if step not in logged]
            if new:
                client.log_batch(run_id, metrics=new)
            with tempfile.TemporaryDirectory(prefix="cytoray-mlflow-") as tmp:
                for uri, folder in artifacts(run_uri, manifest_uri):
                    if storage.exists(uri, storage_cfg):
                        local = os.path.join(tmp, folder, uri.rstrip("/").rsplit("/", 1)[-1])
                        os.makedirs(os.path.dirname(local), exist_ok=True)
                        with open(local, "wb") as f:
                            f.write(storage.read_bytes(uri, storage_cfg))
                        client.log_artifact(run_id, local, folder or None)
            client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - tracking never fails a finished run
        log.warning("MLflow run %s not completed (%s); %s holds metrics.csv, eval/ and training.html", run_id,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__, run_uri)


class MetricsSender:
    """Rank 0's log-step rows to the MLflow run, from a background thread. After a failure restart, steps the run
    logged before are skipped (an exact resume computes them again; MLflow would keep both points)."""

    def __init__(self, spec: dict):
        self.spec, self.pending = spec, queue.Queue()
        self.thread = threading.Thread(target=self._send, name="cytoray-mlflow", daemon=True)
        self.thread.start()

    def log(self, step: int, row: dict[str, float]) -> None:
        self.pending.put((step, dict(row), int(time.time() * 1000)))

    def close(self, timeout_s: float = 60.0) -> None:
        """Send what is queued (waiting at most ``timeout_s``)."""
        self.pending.put(None)
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("MLflow: metrics still unsent after %.0f s, left behind (metrics.csv has them)", timeout_s)

    def _send(self) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client, last_logged, warned = None, -1, False
        while (item := self.pending.get()) is not None:
            step, row, now = item
            try:
                if client is None:
                    with _quiet():
                        client = MlflowClient(self.spec["uri"])
                        last_logged = max((m.step for m in client.get_metric_history(self.spec["run_id"], "loss")),
                                          default=-1)
                if step > last_logged:
                    client.log_batch(self.spec["run_id"], metrics=[Metric(k, float(v), now, step)
                                                                   for k, v in row.items()])
            except Exception as exc:  # noqa: BLE001 - tracking never stops training
                client = None
                if not warned:
                    log.warning("MLflow: metrics of step %d not logged (%s); training goes on, metrics.csv has every "
                                "row (further failures are not reported)", step, str(exc).splitlines()[0][:300])
                    warned = True
