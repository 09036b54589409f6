"""The dedup stage on a multi-node Ray cluster with its run directory on object storage, and with a data node lost
while the stage runs: both publish exactly what the stage publishes in one process.

One machine, three raylets (``ray.cluster_utils.Cluster``): a head without CPUs (the driver) and two data nodes
with 1 CPU and a 100 MB object store each. The run directories live on the local S3 endpoint (moto, the session's
``s3`` fixture); every pass of the stage is a Ray task (``scale.mode=ray``), 4 shards, the near-duplicate search
a join over several list partitions. This proves that

* the Ray tasks run on both data nodes, read and write the run directory on S3 only, and the run's outputs
  (``duplicates.parquet``, ``deduplicated.parquet``, the kept mask, the summary with its accounting and
  verification counts) equal the one-process run's on a local directory;
* removing a data node while one of the join's compare tasks (``_compare``) runs on it costs nothing: the task is
  retried elsewhere and the stage publishes the same result, nothing lost and nothing counted twice. The task is
  caught running, not by timing: its worker process (``ray::<task>``, a child of the node's raylet) is stopped
  with SIGSTOP, its title checked again (still that task), and only then is the node removed.

The cluster lives in a subprocess (this file run as a script), so it neither meets nor disturbs the session's
``ray_local`` instance; its Ray temp dir is private (``RAY_TMPDIR``), so ``ray.init()`` elsewhere on the machine
does not find it through ``/tmp/ray/ray_current_cluster``.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest

from cytoray.curation.dedup import DedupConfig
from cytoray.curation.dedup_stage import run_dedup
from cytoray.curation.shards import ScaleConfig, load_mask
from cytoray.curation.stage import read_marker
from cytoray.tables import read_table

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N = 800  # planted images: 3 lists (flat_max 300), up to 3 list partitions per view (partition_rows 300), 4 shards
CFG = DedupConfig(flat_max=300, partition_rows=300)
SHARD_ROWS = 200
TARGET = "_compare"  # the near-duplicate join's compare pass: one task per view and list partition
MB = 1 << 20


# ------------------------------------------------------------------------------------- scenario (subprocess)


def _stage_tasks() -> set[str]:
    """Names of the dedup stage's task functions (a task's worker is titled ``ray::<name>`` while it runs it)."""
    import inspect

    from cytoray.curation import dedup_stage

    return {name for name, f in vars(dedup_stage).items()
            if inspect.isfunction(f) and f.__module__ == dedup_stage.__name__}


class _Workers:
    """The worker processes of the data nodes (children of each node's raylet, listed again every 0.25 s: a full
    process scan) and the task each runs now, by its title (``/proc/<pid>/cmdline``: cheap enough for 100 polls
    a second)."""

    def __init__(self, nodes: dict, names: set[str]):
        self.nodes, self.names, self.pids, self.listed = nodes, names, {}, 0.0

    def running(self) -> dict:
        """{worker pid: (node id, task name)} for every worker running one of ``names`` now."""
        import psutil

        if time.time() - self.listed > 0.25:
            self.pids, self.listed = {}, time.time()
            for node_id, node in self.nodes.items():
                try:
                    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
                    self.pids.update({c.pid: node_id for c in raylet.children(recursive=True)})
                except (KeyError, psutil.Error):  # removed
                    continue
        out = {}
        for pid, node_id in self.pids.items():
            title = _title(pid)
            if title.startswith("ray::") and title[len("ray::"):] in self.names and node_id in self.nodes:
                out[pid] = (node_id, title[len("ray::"):])
        return out


def _title(pid: int) -> str:
    """A process's title (``ray::_compare`` for a worker running that task); "" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace").strip()
    except OSError:
        return ""


def _task_attempts(names: set[str]) -> list[dict]:
    """Every (task, attempt) of ``names`` in the GCS task table, with the nodes it was reported on."""
    import ray._private.state
    from ray.core.generated import gcs_pb2

    seen: dict = {}
    for raw in ray._private.state.state._connect_and_get_accessor().get_task_events():
        ev = gcs_pb2.TaskEvents.FromString(raw)
        key = (ev.task_id.hex(), ev.attempt_number)
        row = seen.setdefault(key, {"task": key[0], "attempt": key[1], "name": None, "nodes": []})
        if ev.HasField("task_info"):
            row["name"] = ev.task_info.name
        if ev.HasField("state_updates") and ev.state_updates.node_id:
            row["nodes"] = sorted(set(row["nodes"]) | {ev.state_updates.node_id.hex()})
    return [r for r in seen.values() if r["name"] in names]


def _scenario(report_path: str, storage_json: str, multi_uri: str, lost_uri: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from cytoray.storage import StorageConfig

    storage_cfg = StorageConfig(**json.loads(storage_json))
    scale = ScaleConfig(mode="ray", shard_rows=SHARD_ROWS)
    names = _stage_tasks()
    report: dict = {"runs": {}, "tasks": sorted(names)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": 100 * MB})
    try:
        nodes = {}
        for _ in range(2):
            node = cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
            nodes[node.node_id] = node
        cluster.wait_for_nodes()
        cluster.connect()
        report["head"], report["data_nodes"] = cluster.head_node.node_id, sorted(nodes)
        workers = _Workers(nodes, names)

        def run(name, uri, on_poll=None):
            """The stage in a thread; this thread polls the data nodes' workers until it returns."""
            out, seen = {}, set()

            def body():
                try:
                    run_dedup(uri, CFG, storage_cfg=storage_cfg, scale=scale)
                except BaseException as exc:  # reported, asserted on by the test
                    out["error"] = repr(exc)
                out["end"] = time.time()

            stage = threading.Thread(target=body, daemon=True)
            start = time.time()
            stage.start()
            while stage.is_alive():
                running = workers.running()
                seen |= {(node, task) for node, task in running.values()}
                # the tasks take a second or so: 10 polls a second see where they ran
                time.sleep(on_poll(running, stage) if on_poll else 0.1)
            report["runs"][name] = {"error": out.get("error"), "start": start, "end": out["end"],
                                    "seen": sorted(seen)}

        run("multi", multi_uri)

        removal: dict = {}

        def remove_while_comparing(running, stage) -> float:
            """Removes the node of the first compare task seen running; the next poll's delay."""
            if removal:
                return 0.1
            for pid, (node_id, task) in sorted(running.items()):
                if task != TARGET:
                    continue
                os.kill(pid, signal.SIGSTOP)  # frozen mid-task: it cannot finish before its node is gone
                title = _title(pid)
                if title != f"ray::{task}":  # it finished between the poll and the stop
                    os.kill(pid, signal.SIGCONT)
                    continue
                removal.update(node=node_id, task=task, pid=pid, title=title, t=time.time(),
                               stage_running=stage.is_alive())
                cluster.remove_node(nodes.pop(node_id), allow_graceful=False)
                if _title(pid):  # a worker outlives its SIGKILLed raylet for a moment; this one is stopped
                    os.kill(pid, signal.SIGKILL)
                return 0.1
            return 0.01

        run("lost", lost_uri, remove_while_comparing)
        report["removal"] = removal
        # the task table: the compare task caught on the removed node ran again (attempt 1). Owners report task
        # events once a second; wait for them
        deadline = time.time() + 15
        while True:
            report["attempts"] = _task_attempts(names)
            if any(a["attempt"] > 0 for a in report["attempts"]) or time.time() > deadline:
                break
            time.sleep(0.5)
        report["nodes_after"] = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    finally:
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------------------------------- tests


def _outputs(uri, storage_cfg=None) -> dict:
    dups = read_table(f"{uri}/duplicates.parquet", storage_cfg).to_pandas()
    return {"dups": dups.sort_values("image_id").reset_index(drop=True),
            "kept": read_table(f"{uri}/deduplicated.parquet", storage_cfg, ["image_id"]).column("image_id").to_pylist(),
            "mask": load_mask(uri, storage_cfg=storage_cfg), "summary": read_marker(uri, "dedup", storage_cfg)}


@pytest.fixture(scope="module")
def runs(s3, tmp_path_factory):
    """The planted collection deduplicated in one process on a local directory (the reference), and on the
    cluster with run directories on S3: once as is, once losing a data node mid-stage."""
    from cytoray.curation.synthetic.planted import make_collection, write_run
    from cytoray.storage import filesystem

    tmp = tmp_path_factory.mktemp("dedup-cluster")
    ingested, embeddings, _ = make_collection(N, 8, 0.1, seed=3)
    local = str(tmp / "local")
    write_run(local, ingested, embeddings, {"test": "dedup-cluster"})
    run_dedup(local, CFG, scale=ScaleConfig(mode="local", shard_rows=SHARD_ROWS))
    prefix = f"s3://cytoray-test/dedup-cluster-{uuid.uuid4().hex[:8]}"
    uris = {name: f"{prefix}/{name}" for name in ("multi", "lost")}
    for uri in uris.values():
        write_run(uri, ingested, embeddings, {"test": "dedup-cluster"}, storage_cfg=s3)

    ray_tmp = tempfile.mkdtemp(prefix="crd", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "OMP_NUM_THREADS": "1",
           # a node whose raylet is gone is declared dead after 3 missed health checks a second apart (~3 s, not
           # Ray's 15 s): only then are its tasks retried. A slow live node still has 10 s per check
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    report_path = tmp / "report.json"
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(report_path),
                               json.dumps(dataclasses.asdict(s3)), uris["multi"], uris["lost"]],
                              env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and report_path.exists(), f"scenario failed (rc {proc.returncode}):\n{log[-6000:]}"
    report = json.loads(report_path.read_text())
    for name, r in report["runs"].items():
        assert r["error"] is None, f"the {name} run failed: {r['error']}\n{log[-6000:]}"
    fs, _ = filesystem(prefix, s3)
    return {"local": _outputs(local), "report": report, "log": log, "fs": fs, "uris": uris,
            **{name: _outputs(uri, s3) for name, uri in uris.items()}}


def _assert_same_result(got: dict, want: dict) -> None:
    cols = ["image_id", "duplicate_of", "reason"]
    assert got["dups"][cols].equals(want["dups"][cols])
    np.testing.assert_allclose(got["dups"].similarity, want["dups"].similarity, atol=1e-6)
    assert got["kept"] == want["kept"] and np.array_equal(got["mask"], want["mask"])
    # nothing lost, nothing counted twice
    ids = got["kept"] + got["dups"].image_id.tolist()
    assert len(ids) == len(set(ids)) == N and got["mask"].sum() == len(got["kept"])
    a, b = got["summary"], want["summary"]
    assert a["datasets"] == b["datasets"] and a["total"] == b["total"]
    assert a["total"]["images"] == N == a["total"]["kept"] + a["total"]["duplicates"]
    assert a["verification"] == b["verification"]
    # the join's accounting too: lists, partitions, compare tasks, rows routed, bytes written and read (a retried
    # task's first attempt counts nothing)
    sa, sb = dict(a["search"]), dict(b["search"])
    assert sa.pop("ray_tasks") and not sb.pop("ray_tasks")
    assert sa == sb


def _no_staging_left(runs, name):
    fs, uri = runs["fs"], runs["uris"][name]
    path = uri.removeprefix("s3://")
    left = fs.find(f"{path}/_staging") if fs.exists(f"{path}/_staging") else []
    assert not left, f"staging files left behind by the {name} run: {left[:5]}"


def test_multi_node_run_on_object_storage_equals_one_process(runs):
    want, got, report = runs["local"], runs["multi"], runs["report"]
    search = want["summary"]["search"]
    assert search["lists"] > 1 and max(search["partitions"]) > 1 and search["shards"] >= 4  # the partitioned join
    assert want["summary"]["total"]["near"] > 20 and want["summary"]["total"]["exact"] > 0
    _assert_same_result(got, want)
    # both data nodes ran tasks of the stage (the head has no CPUs: none ran there)
    seen = report["runs"]["multi"]["seen"]
    assert {node for node, _ in seen} == set(report["data_nodes"]), seen
    assert TARGET in report["tasks"] and TARGET in {task for _, task in seen}, seen
    # every output is on S3 (the local reference is another directory)
    fs, path = runs["fs"], runs["uris"]["multi"].removeprefix("s3://")
    for name in ("duplicates.parquet", "deduplicated.parquet", "kept_rows.npy", "_stages/dedup.json"):
        assert fs.exists(f"{path}/{name}"), name
    assert len([p for p in fs.ls(f"{path}/deduplicated.parquet") if p.endswith(".parquet")]) == 4  # one per shard
    _no_staging_left(runs, "multi")


def test_losing_a_data_node_mid_stage_loses_nothing_and_counts_nothing_twice(runs):
    report = runs["report"]
    removal, lost = report["removal"], report["runs"]["lost"]
    assert removal, f"no compare task was caught running on a data node: {lost['seen']}\n{runs['log'][-3000:]}"
    # the node went while the stage ran, with one of its compare tasks stopped mid-way on it
    assert removal["task"] == TARGET and removal["title"] == f"ray::{TARGET}"
    assert removal["stage_running"] and lost["start"] < removal["t"] < lost["end"]
    assert removal["node"] in report["data_nodes"] and report["nodes_after"][removal["node"]] is False  # dead
    # ... and that task ran again (Ray's retry: attempt 1) and the stage finished on the other node
    retried = [a for a in report["attempts"] if a["attempt"] > 0]
    assert any(a["name"] == removal["task"] for a in retried), report["attempts"]
    others = set(report["data_nodes"]) - {removal["node"]}
    assert all(set(a["nodes"]) <= others for a in retried), retried
    _assert_same_result(runs["lost"], runs["local"])
    _no_staging_left(runs, "lost")


if __name__ == "__main__":
    _scenario(*sys.argv[1:5])
