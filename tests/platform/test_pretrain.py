"""FSDP2 pretraining across 2 Ray Train workers on CPU (gloo): real sharding, sharded checkpoints, exact resume
after an injected worker failure and after a driver restart, teacher exports that load."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from cytoray.config import ConfigError
from cytoray.platform.config import load_pretrain_config
from cytoray.platform.data.stream import ManifestError
from cytoray.platform.models.checkpoints import build_from_checkpoint, detect_format, read_checkpoint
from cytoray.platform.train import pretrain
from cytoray.testing import write_cell_manifest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_DEBUG = os.path.join(REPO, "recipes", "configs", "cpu_debug.yaml")


def _cfg(manifest, storage, name, *overrides):
    return load_pretrain_config(["--config", CPU_DEBUG, f"data.manifest_uri={manifest}", f"run.name={name}",
                                 f"run.storage_path={storage}", "model.batch_size_per_device=4",
                                 "train.checkpoint_every=4", "train.log_every=4", "data.num_cpus=0.25",
                                 *overrides], preset="dinobloom_s")


def _curve(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], {k: np.array([float(r[k]) for r in rows]) for k in ("loss", "lr", "momentum", "grad_norm_backbone", "grad_norm_dino_head",
                                                                        "grad_clipped_dino_head")}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_cell_manifest(str(tmp_path_factory.mktemp("cells")), 40, seed=1)


def test_resume_history_equals_one_run_and_every_checkpoint_is_probed(ray_local, manifest, tmp_path):
    """A run is a function of its config, seed and global batch. Reference: 12 steps on 1 worker. The other
    history: 2 workers, the last rank fails at step 6 (the workers restart from the step-4 checkpoint) and the
    run stops at 8; the driver is run again on 4 workers to step 10 and once more on 1 worker to 12 (DCP reshards
    model and optimizer each time). Both give the same loss at every step; stochastic depth is on, so its
    per-sample draws are covered too.

    The reference run also has Ray Train V2 validation on: each checkpoint is probed in a separate task; the
    scores land in the checkpoint's metrics (best-by-probe retention uses them) and in <run>/eval/results.csv,
    and they equal the standalone probe."""
    import json

    from cytoray.eval import probe, validation

    storage = str(tmp_path / "runs")
    common = ("model.global_batch_size=4", "train.cpus_per_worker=0.2", "data.num_cpus=0.2",
              "model.vit.drop_path_rate=0.2")
    heldout = write_cell_manifest(str(tmp_path / "heldout"), 60, seed=7)
    clean = pretrain(_cfg(manifest, storage, "clean", "train.num_workers=1", *common, "train.max_steps=12",
                          f"eval.manifests=[{heldout}]", "eval.keep_best=true", "train.keep_checkpoints=1",
                          "eval.probe.folds=3"))
    assert clean.error is None
    first = pretrain(_cfg(manifest, storage, "faulty", "train.num_workers=2", *common, "train.max_steps=8",
                          "train.fail_at_step=6"))
    assert first.error is None and os.path.exists(os.path.join(storage, "faulty", "_injected_failure_step6"))
    for workers, stop in ((4, 10), (1, 12)):
        again = pretrain(_cfg(manifest, storage, "faulty", f"train.num_workers={workers}", *common,
                              f"train.max_steps={stop}"))
        assert again.error is None and again.checkpoint.path.endswith(f"checkpoint_{stop:08d}")
        with open(os.path.join(storage, "faulty", f"checkpoint_{stop:08d}", "train_state.json")) as f:
            state = json.load(f)
        assert (state["world_size"], state["batch_size_per_device"], state["samples_consumed"]) == \
            (workers, 4 // workers, 4 * stop)

    steps_a, a = _curve(os.path.join(storage, "clean"))
    steps_b, b = _curve(os.path.join(storage, "faulty"))
    assert steps_a == steps_b == list(range(12))  # one continuous curve, no repeated or missing steps
    np.testing.assert_allclose(b["lr"], a["lr"])  # same schedule position
    np.testing.assert_allclose(b["momentum"], a["momentum"])
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)  # same data, crops, masks, drops and state
    # per-part gradient norms (before clipping, full cross-rank norms) logged at every step, the same on any world
    np.testing.assert_allclose(b["grad_norm_backbone"], a["grad_norm_backbone"], rtol=1e-3)
    np.testing.assert_allclose(b["grad_norm_dino_head"], a["grad_norm_dino_head"], rtol=1e-3)
    assert (a["grad_norm_backbone"] > 0).all() and set(a["grad_clipped_dino_head"]) <= {0.0, 1.0}
    assert a["loss"][-4:].mean() < a["loss"][:4].mean()

    # sharded checkpoints: one file per rank, each well under the whole
    ckpt = os.path.join(storage, "faulty", "checkpoint_00000008")
    shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    sizes = [os.path.getsize(os.path.join(ckpt, f)) for f in shards]
    assert max(sizes) < 0.7 * sum(sizes), sizes

    # teacher exports in the DinoBloom layout, loadable, identical between the two histories
    exp_a = os.path.join(storage, "clean", "exports", "teacher_00000012.pth")
    exp_b = os.path.join(storage, "faulty", "exports", "teacher_00000012.pth")
    assert detect_format(read_checkpoint(exp_b)) == "cytoray"
    model_a, model_b = build_from_checkpoint(exp_a), build_from_checkpoint(exp_b)
    for (k, va), vb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    with torch.no_grad():
        out = model_b(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64) and torch.isfinite(out).all()

    # per-checkpoint validation of the reference run
    run = os.path.join(storage, "clean")
    with open(os.path.join(run, "eval", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    methods = {"linear", "knn1", "knn20", "knn20_T0.07"}
    assert {(int(r["step"]), r["method"]) for r in rows} == {(s, m) for s in (4, 8, 12) for m in methods}
    assert all(r["manifest"] == "heldout" and r["images"] == "60" for r in rows)
    score = {int(r["step"]): float(r["balanced_accuracy"]) for r in rows if r["method"] == "linear"}
    assert min(score.values()) > 1 / 11 + 0.2  # 11 cell types: well above chance even after 4 steps
    # the scores are the checkpoint's metrics; with keep_best the best-by-probe checkpoint (+ the latest) remain
    kept = {int(os.path.basename(c.path).split("_")[1]): m for c, m in clean.best_checkpoints}
    for step, m in kept.items():
        assert m["probe_step"] == step and m["probe_score"] == pytest.approx(score[step], abs=1e-6)
        assert m["probe/heldout/knn20_T0.07/balanced_accuracy"] >= 0
    best = max(score, key=lambda s: (score[s], s))  # ties: the later checkpoint
    assert set(kept) == {best}  # Ray's ranking; the latest checkpoint stays on disk too (the resume point)
    assert sorted(d for d in os.listdir(run) if d.startswith("checkpoint_0")) == \
        [f"checkpoint_{s:08d}" for s in sorted({best, 12})]
    # the validation task read only the teacher from the sharded checkpoint: same weights as the export ...
    from_dcp = build_from_checkpoint(os.path.join(run, "checkpoint_00000012"))
    for (k, a_), b_ in zip(from_dcp.state_dict().items(), model_a.state_dict().values()):
        torch.testing.assert_close(a_, b_, rtol=0, atol=0, msg=k)
    # ... and the standalone probe of that checkpoint directory gives the same numbers
    standalone = probe.evaluate(os.path.join(run, "checkpoint_00000012"), [heldout],
                                probe.ProbeConfig(num_actors=0, folds=3))[0]
    assert standalone["methods"]["linear"]["balanced_accuracy"] == pytest.approx(score[12], abs=1e-6)
    assert "probe of every scored checkpoint" not in validation.format_results_table(rows)  # table only
    assert len(validation.format_results_table(rows).splitlines()) == 2 + 3


def test_bad_settings_fail_before_launch(ray_local, manifest, tmp_path):
    with pytest.raises(ConfigError, match="train.use_gpu=true but this cluster has no GPUs"):
        pretrain(_cfg(manifest, str(tmp_path), "x", "train.use_gpu=true"))
    with pytest.raises(ManifestError, match="cannot be read"):
        pretrain(_cfg(str(tmp_path / "nope.parquet"), str(tmp_path), "x"))
    with pytest.raises(ConfigError, match="multiples of model.vit.patch_size=8"):
        pretrain(_cfg(manifest, str(tmp_path), "x", "model.augment.local_crops.size=30"))
    with pytest.raises(ConfigError, match=r"eval.manifests: labelled manifest .*nope.parquet does not exist"):
        pretrain(_cfg(manifest, str(tmp_path), "x", f"eval.manifests=[{tmp_path / 'nope.parquet'}]"))
    with pytest.raises(ConfigError, match="model.optim.clip_scope='per_layer': must be one of"):
        pretrain(_cfg(manifest, str(tmp_path), "x", "model.optim.clip_scope=per_layer"))
    with pytest.raises(ConfigError, match="eval.every must be >= 1"):
        pretrain(_cfg(manifest, str(tmp_path), "x", f"eval.manifests=[{manifest}]", "eval.every=0"))
    with pytest.raises(ConfigError, match=r"tracking.mlflow_uri='unknown-scheme://x': the MLflow store cannot be used"):
        pretrain(_cfg(manifest, str(tmp_path), "x", "tracking.mlflow=true", "tracking.mlflow_uri=unknown-scheme://x"))
    with pytest.raises(ConfigError, match="export.card_paths='absolute': choose one of relative, full, none"):
        pretrain(_cfg(manifest, str(tmp_path), "x", "export.card_paths=absolute"))
    with pytest.raises(ConfigError, match="unknown preset"):
        _cfg(manifest, str(tmp_path), "x", "preset=vit_tiny")


def test_object_storage_run_streams_checkpoints_and_resumes(ray_local, s3, tmp_path):
    """Images, manifest, checkpoints, metrics, exports and training.html all on the local S3 endpoint (moto's
    server); both launches tracked in one MLflow run (a local SQLite store)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cytoray import storage
    from cytoray.testing import upload_dir

    def upload_cells(name, n, seed):
        local = tmp_path / name
        table = pq.read_table(write_cell_manifest(str(local), n, seed=seed))
        uris = [f"s3://cytoray-test/{name}/{os.path.basename(u)}" for u in table.column("uri").to_pylist()]
        pq.write_table(table.set_column(table.column_names.index("uri"), "uri", pa.array(uris)),
                       local / "manifest.parquet")
        upload_dir(str(local), f"s3://cytoray-test/{name}", s3)

    upload_cells("cells", 16, 2)
    upload_cells("heldout", 40, 7)
    creds = [f"storage.endpoint_url={s3.endpoint_url}", f"storage.region={s3.region}",
             f"storage.access_key_id={s3.access_key_id}", f"storage.secret_access_key={s3.secret_access_key}"]
    mlflow_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = ("s3://cytoray-test/cells/manifest.parquet", "s3://cytoray-test/runs", "s3run", *creds,
            "tracking.mlflow=true", f"tracking.mlflow_uri={mlflow_uri}")
    # activation checkpointing (composable: parameter names unchanged, so checkpoints stay interchangeable)
    assert pretrain(_cfg(*args, "train.max_steps=4", "parallel.activation_checkpointing=true")).error is None
    # resumes from step 4; its checkpoint is probed on a held-out manifest on S3
    result = pretrain(_cfg(*args, "train.max_steps=6", "train.checkpoint_every=2", "eval.probe.folds=2",
                           "eval.manifests=[s3://cytoray-test/heldout/manifest.parquet]"))
    assert result.error is None
    assert result.metrics["probe_step"] == 6 and 0 < result.metrics["probe_score"] <= 1
    table = storage.read_bytes("s3://cytoray-test/runs/s3run/eval/results.csv", s3).decode().splitlines()
    assert len(table) == 1 + 4 and all(line.startswith("6,s3://cytoray-test/runs/s3run/checkpoint_00000006,heldout")
                                       for line in table[1:])
    # the teacher read from the sharded checkpoint on S3 (ranged reads) is the exported teacher
    from_dcp = build_from_checkpoint("s3://cytoray-test/runs/s3run/checkpoint_00000006", s3)
    exported = build_from_checkpoint("s3://cytoray-test/runs/s3run/exports/teacher_00000006.pth", s3)
    for (k, a), b in zip(from_dcp.state_dict().items(), exported.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    fs, _ = storage.filesystem("s3://cytoray-test", s3)
    names = {p.rsplit("/", 1)[-1] for p in fs.find("cytoray-test/runs/s3run")}
    assert {"__0_0.distcp", "__1_0.distcp", "train_state.json", "metrics.csv", "config.yaml",
            "teacher_00000006.pth"} <= names
    assert fs.exists("cytoray-test/runs/s3run/checkpoint_00000006/train_state.json")
    csv_text = storage.read_bytes("s3://cytoray-test/runs/s3run/metrics.csv", s3).decode()
    assert [int(line.split(",")[0]) for line in csv_text.splitlines()[1:]] == list(range(6))
    assert s3.secret_access_key not in storage.read_bytes("s3://cytoray-test/runs/s3run/config.yaml", s3).decode()
    assert storage.exists("s3://cytoray-test/runs/s3run/training.html", s3)

    # MLflow: one run over both launches; rank 0's row of every log step (4 steps, then 2 more: steps 3 and 5),
    # the checkpoint's probe at step 6, the config (redacted) and the report as artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cytoray").experiment_id])
    assert run.data.tags["cytoray.run_uri"] == "s3://cytoray-test/runs/s3run" and run.info.status == "FINISHED"
    assert run.data.params["model.vit.arch"] == "vit_debug" and run.data.params["train.log_every"] == "4"
    assert run.data.params["storage.secret_access_key"] == "***"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3, 5]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "images_per_s")} == {3, 5}
    probe = client.get_metric_history(run.info.run_id, "probe/heldout/linear/balanced_accuracy")
    linear = next(line for line in table[1:] if ",linear," in line).split(",")
    assert [(m.step, m.value) for m in probe] == [(6, pytest.approx(float(linear[6])))]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "training.html", "model"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/hf", "model/timm", "model/dinobloom"}  # each final export's model card
    # the final export (train.final_export): every format of the last teacher, each with its card
    final = build_from_checkpoint("s3://cytoray-test/runs/s3run/exports/final/dinobloom/model.pth", s3)
    for (k, a), b in zip(final.state_dict().items(), exported.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert {"config.json", "model.safetensors", "README.md"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls("cytoray-test/runs/s3run/exports/final/hf")}
    # export.card_paths=relative: object-storage URIs as configured, no local path; full paths beside the export
    card = fs.cat_file("cytoray-test/runs/s3run/exports/final/hf/README.md").decode()
    assert "| Training manifest | `s3://cytoray-test/cells/manifest.parquet` |" in card and str(tmp_path) not in card
    provenance = json.loads(fs.cat_file("cytoray-test/runs/s3run/exports/final/provenance.json"))
    assert provenance["run"] == "s3://cytoray-test/runs/s3run" and provenance["card_paths"] == "relative"
