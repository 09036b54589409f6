"""`ray start --head` + `ray job submit --working-dir .` of the curate recipe: the way users run cytoray."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from cytoray.runtime import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def head_node():
    # The job entrypoint runs `python` from the head node's PATH: the project's environment comes first.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    gcs, dash = free_port(), free_port()
    # Free ports for every agent: the test session's own Ray instance already holds the defaults
    # (e.g. the dashboard agent's 52365), and a second head on them starts without a job agent.
    agents = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
              f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    temp = f"/tmp/ray_e2e_{os.getpid()}"  # short: unix socket paths have a length limit
    cmd = [f"{BIN}/ray", "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats",
           *agents]
    # Workers inherit RAY_ADDRESS: with the test session's own instance on this machine, Ray Train's placement-group
    # cleaner otherwise finds two local instances and fails to connect (one cluster per machine in real use).
    subprocess.run(cmd, check=True, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, capture_output=True, timeout=180)
    try:
        yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}"
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_cluster(temp: str) -> None:
    """Stop only this head's processes (`ray stop` would also kill the test session's own Ray instance)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except psutil.Error:
            pass
    for p in procs:
        p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=3)  # a worker or two ignores SIGTERM: do not wait for them
    for p in alive:
        p.kill()


def _submit(cmd, env):
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a few seconds after `ray start` returns
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
        if "No available agent" not in proc.stderr + proc.stdout or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    return proc


def _job_output(proc) -> list[str]:
    """The job's own lines in `ray job submit`'s output: after 'Tailing logs', Ray's two job-manager lines,
    before the closing '----' banner."""
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if "Tailing logs until the job exits" in line) + 1
    end = next(i for i in range(len(lines) - 1, start - 1, -1) if "SUCC cli.py" in lines[i] and "----" in lines[i])
    end = next(i for i in range(end - 1, start - 1, -1) if "SUCC cli.py" not in lines[i]) + 1
    ray_lines = ("Runtime env is setting up", "Running entrypoint for job")
    return [line for line in lines[start:end] if line.strip() and not any(r in line for r in ray_lines)]


def _check_console(proc, budget: int, expected: list[str], run_dir, noise: str) -> None:
    """The terminal shows a few summary lines; the run log in <run>/logs/ keeps the rest (cytoray.console)."""
    shown = _job_output(proc)
    assert len(shown) <= budget, "\n".join(shown)
    for prefix in expected:
        assert any(line.startswith(prefix) for line in shown), (prefix, shown)
    logs = list((run_dir / "logs").glob("*.log"))
    assert len(logs) == 1 and shown[-1] == f"full log: {logs[0]}", shown
    assert noise in logs[0].read_text() and not any(noise in line for line in shown)


def test_curate_recipe_runs_under_ray_job_submit(head_node, collection, tmp_path):
    import yaml

    env, dashboard, _ = head_node
    ds_file = tmp_path / "datasets.yaml"
    subset = [d for d in collection["datasets"] if d["name"] in ("matek", "bccd", "table_set")]
    ds_file.write_text(yaml.safe_dump({"datasets": subset}))
    out = tmp_path / "run"
    cmd = [f"{BIN}/ray", "job", "submit", f"--address={dashboard}", "--working-dir", REPO, "--",
           "python", "recipes/curate.py", "--config", "recipes/configs/curate.yaml", "--config", str(ds_file),
           f"output_uri={out}"]
    proc = _submit(cmd, env)
    _check_console(proc, 9, ["ingest: ", "embed: ", "dedup: ", "cluster: ", "balance: ", "outputs: ", "report: "], out,
                   "Execution plan of Dataset")
    summary = json.loads((out / "summary.json").read_text())
    t = summary["total"]
    assert t["input_files"] == t["kept_files"] + t["quarantined_files"] and t["kept"] > 0
    assert t["images"] == t["kept"] + t["duplicates"]
    assert (out / "manifest.parquet").exists() and (out / "config.yaml").exists() and (out / "report.html").exists()
    assert summary["total"]["sampled_images"] > 0 and summary["balance"]["samples_per_epoch"] == t["kept"]


def test_pretrain_recipe_runs_under_ray_job_submit(head_node, tmp_path):
    """The README's cluster commands with the debug preset: 2 FSDP2 workers on CPU, checkpoints that load."""
    from cytoray.platform.models.checkpoints import build_from_checkpoint
    from cytoray.testing import write_cell_manifest

    env, dashboard, _ = head_node
    manifest = write_cell_manifest(str(tmp_path / "cells"), 24)
    runs = tmp_path / "runs"
    cmd = [f"{BIN}/ray", "job", "submit", f"--address={dashboard}", "--working-dir", REPO, "--",
           "python", "recipes/pretrain_vitl.py", "--config", "recipes/configs/cpu_debug.yaml",
           f"data.manifest_uri={manifest}", "run.name=e2e", f"run.storage_path={runs}", "train.max_steps=4",
           "train.checkpoint_every=2", "model.batch_size_per_device=4", "data.num_cpus=0.25"]
    proc = _submit(cmd, env)
    run = runs / "e2e"
    _check_console(proc, 8, ["vit_debug: 0.4M parameters", "step 4/4 loss ", "run: "], run, "Reporting training result")
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000002", "checkpoint_00000004"]
    ckpt = run / "checkpoint_00000004"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "train_state.json").read_text())["samples_consumed"] == 4 * 2 * 4
    model = build_from_checkpoint(str(run / "exports" / "teacher_00000004.pth"))
    assert model.cfg.arch == "vit_debug"
    assert (run / "config.yaml").exists() and (run / "metrics.csv").exists()
