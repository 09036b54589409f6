"""Pretraining on a labelled multi-node cluster survives losing a data node and a training node, exactly.

One machine, several raylets (``ray.cluster_utils.Cluster``): a head without CPUs (driver, Train controller),
two nodes labelled ``cytoray-role=train`` and two labelled ``cytoray-role=data``. The debug run is elastic
(``train.num_workers=[1, 2]``, ``model.global_batch_size=4``) with ``train.label_selector`` and
``data.label_selector`` set. This proves that

* the label selectors reach Ray: every Ray Train worker ran on a train node, every ``MultiCropBatches`` decode
  actor (``MapWorker(MapBatches(MultiCropBatches))``) on a data node (Ray's actor table, polled during the runs);
* removing the data node that hosts decode actors mid-run costs nothing: the actors restart on the other data
  node and the same worker group trains on (no worker-group restart);
* removing a train node mid-run makes Ray Train V2's elastic mode restart on the one node left, with one
  worker, from the last checkpoint (DCP reshards it), and the run completes;
* the loss curve of that run equals an uninterrupted reference run's at every step (same data, crops, masks).

The cluster lives in a subprocess (this file run as a script), so it neither meets nor disturbs the session's
``ray_local`` instance; its Ray temp dir is private (``RAY_TMPDIR``), so ``ray.init()`` elsewhere on the
machine does not find it through ``/tmp/ray/ray_current_cluster``.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

ROLE = "cytoray-role"
STEPS = 16
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_DEBUG = os.path.join(REPO, "recipes", "configs", "cpu_debug.yaml")


# ------------------------------------------------------------------------------------- scenario (subprocess)


def _overrides(manifest, storage, name):
    # Train nodes have 2 CPUs and a worker takes 2: Ray Train's elastic policy counts workers per node from node
    # totals regardless of labels (AutoscalingCoordinator), so a data node (1 CPU) must be unable to hold one.
    return ["--config", CPU_DEBUG, f"data.manifest_uri={manifest}", f"run.name={name}", f"run.storage_path={storage}",
            "train.num_workers=[1,2]", "model.global_batch_size=4", "train.cpus_per_worker=2",
            "data.num_cpus=0.5", f"train.max_steps={STEPS}", "train.checkpoint_every=4", "train.log_every=4",
            "train.max_failures=3", f"train.label_selector={{{ROLE}: train}}", f"data.label_selector={{{ROLE}: data}}"]


def _rows(run_dir):
    try:
        with open(os.path.join(run_dir, "metrics.csv")) as f:
            return max(len(f.read().splitlines()) - 1, 0)
    except OSError:
        return 0


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class _ActorWatch(threading.Thread):
    """Polls the GCS actor table (no dashboard needed): every (actor, node) pair a Ray Train worker or a decode
    actor was seen alive on, and when first."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen, self.stop, self.lock = {}, threading.Event(), threading.Lock()

    def poll(self) -> dict:
        """Alive actors of interest now: {actor id: (name, node id)}; records them in ``seen``."""
        import ray._private.state
        from ray.core.generated import gcs_pb2

        alive = {}
        for raw in ray._private.state.state._connect_and_get_accessor().get_actor_table(None, None):
            a = gcs_pb2.ActorTableData.FromString(raw)
            name = a.repr_name or a.class_name  # repr: MapWorker(MapBatches(MultiCropBatches))
            if a.state == gcs_pb2.ActorTableData.ALIVE and ("RayTrainWorker" in name or "MultiCropBatches" in name):
                alive[a.actor_id.hex()] = (name, a.address.node_id.hex())
        with self.lock:
            for actor, (name, node) in alive.items():
                self.seen.setdefault((actor, node), {"actor": actor, "node": node, "name": name, "t": time.time()})
        return alive

    def nodes_hosting(self, what: str) -> list[str]:
        """Nodes of the alive ``what`` actors now, most actors first."""
        nodes = [node for name, node in self.poll().values() if what in name]
        return sorted(set(nodes), key=lambda n: (-nodes.count(n), n))

    def run(self):
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.25)


def _wait(cond, what, timeout=240):
    end = time.time() + timeout
    while not cond():
        if time.time() > end:
            raise TimeoutError(what)
        time.sleep(0.1)


def _scenario(out, manifest):
    import ray
    from ray.cluster_utils import Cluster

    from cytoray.platform.config import load_pretrain_config
    from cytoray.platform.train import pretrain

    storage = os.path.join(out, "runs")
    report = {"events": [], "runs": {}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        roles, handles = {}, {}
        for role, cpus in (("train", 2), ("train", 2), ("data", 1), ("data", 1)):
            node = cluster.add_node(num_cpus=cpus, labels={ROLE: role})
            roles[node.node_id], handles[node.node_id] = role, node
        cluster.wait_for_nodes()
        cluster.connect()
        report["roles"] = roles
        watch = _ActorWatch()
        watch.start()

        def run(name):
            t0 = time.time()
            result = pretrain(load_pretrain_config(_overrides(manifest, storage, name), preset="dinobloom_s"))
            report["runs"][name] = {"error": repr(result.error) if result.error else None, "start": t0,
                                    "end": time.time()}

        def remove(node, why):
            report["events"].append({"node": node, "role": roles[node], "why": why, "t": time.time(),
                                     "rows": _rows(os.path.join(storage, "elastic"))})
            cluster.remove_node(handles[node])

        def remove_nodes():
            try:
                run_dir = os.path.join(storage, "elastic")
                with watch.lock:
                    earlier = {a for a, _ in watch.seen}  # the reference run's actors

                def decoders():  # this run's alive decode actors: {actor: node}
                    return {a: node for a, (n, node) in watch.poll().items() if "MultiCrop" in n and a not in earlier}

                # While the decode actors are alive (Ray Data ends the pool once a rank's steps are decoded: seconds
                # in this tiny run), take away the data node that hosts them.
                _wait(lambda: decoders(), "decode actors of the elastic run")
                hosting = sorted(decoders().items(), key=lambda kv: kv[0])
                data_node = max({n for _, n in hosting}, key=lambda n: sum(node == n for _, node in hosting))
                moved = {a for a, n in hosting if n == data_node}
                remove(data_node, "hosts decode actors")
                # they come back on the other data node, and the same workers train on past a checkpoint
                _wait(lambda: any(n not in (data_node, "") for a, n in decoders().items() if a in moved),
                      "decode actor restarted on another node")
                # ... until the controller has registered the step-4 checkpoint (Ray Train V2 takes a report off
                # the worker's queue at its next poll; a node lost before that restarts from the previous one)
                _wait(lambda: _rows(run_dir) >= 5 and "checkpoint_00000004" in _read(
                    os.path.join(run_dir, "checkpoint_manager_snapshot.json")), "step-4 checkpoint registered")
                remove(watch.nodes_hosting("RayTrainWorker")[-1], "hosts a training worker")
            except Exception as exc:  # reported, asserted on by the test
                report["events"].append({"error": repr(exc), "t": time.time()})

        run("reference")
        remover = threading.Thread(target=remove_nodes, daemon=True)
        remover.start()
        run("elastic")
        remover.join(timeout=5)
        watch.stop.set()
        watch.join()
        report["seen"] = sorted(watch.seen.values(), key=lambda o: o["t"])
    finally:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        ray.shutdown()
        cluster.shutdown()


# ----------------------------------------------------------------------------------------------------- test


def _curve(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], {k: np.array([float(r[k]) for r in rows]) for k in ("loss", "lr")}


@pytest.mark.slow  # two debug runs on a 5-raylet cluster: ~3-5 min on 2 cores
def test_labelled_topology_survives_losing_a_data_node_and_a_train_node(tmp_path):
    from cytoray.testing import write_cell_manifest

    manifest = write_cell_manifest(str(tmp_path / "cells"), 40, seed=1)
    ray_tmp = tempfile.mkdtemp(prefix="crt", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "OMP_NUM_THREADS": "1",
           # after a node loss the elastic policy may first size the group from a stale view of the cluster
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path), manifest], env=env,
                              capture_output=True, text=True, timeout=840, cwd=REPO)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = proc.stdout + proc.stderr
    report_path = tmp_path / "report.json"
    assert proc.returncode == 0 and report_path.exists(), f"scenario failed (rc {proc.returncode}):\n{log[-6000:]}"
    report = json.loads(report_path.read_text())
    runs = report["runs"]
    assert runs["reference"]["error"] is None, f"reference run failed: {runs['reference']['error']}"
    assert runs["elastic"]["error"] is None, f"run with node losses failed: {runs['elastic']['error']}"
    roles, seen, events = report["roles"], report["seen"], report["events"]
    assert [e.get("role") for e in events] == ["data", "train"], f"node removals did not go as planned: {events}"
    data_lost, train_lost = events[0], events[1]

    # 1. label selectors: Train workers only on train nodes, decode actors only on data nodes
    for o in seen:
        want = "train" if "RayTrainWorker" in o["name"] else "data"
        assert roles[o["node"]] == want, f"{o['name']} ran on a {roles[o['node']]} node, not a {want} node: {o}"
    assert any("MultiCropBatches" in o["name"] for o in seen), f"no decode actor seen: {seen}"

    # 2. the data node's decode actors restarted on the other data node
    moved = {o["actor"] for o in seen if o["node"] == data_lost["node"] and o["t"] < data_lost["t"]}
    assert moved, f"no decode actor was on the removed data node {data_lost['node']}: {seen}"
    again = [o for o in seen if o["actor"] in moved and o["node"] != data_lost["node"]]
    assert again and all(roles[o["node"]] == "data" for o in again), f"decode actors did not restart elsewhere: {seen}"

    # 3. the same worker group trained on through the data node loss; after the train node loss one worker went on
    elastic = runs["elastic"]
    workers = [o for o in seen if "RayTrainWorker" in o["name"] and o["t"] >= elastic["start"]]
    before = {o["actor"] for o in workers if o["t"] < train_lost["t"]}
    after = {o["actor"] for o in workers if o["t"] >= train_lost["t"]}
    assert len(before) == 2, f"the worker group restarted after the data node loss (workers {before}): {events}"
    assert len(after) == 1 and not after & before, f"expected one new worker after the train node loss: {after}"
    assert train_lost["rows"] >= 5, train_lost
    with open(tmp_path / "runs" / "elastic" / f"checkpoint_{STEPS:08d}" / "train_state.json") as f:
        state = json.load(f)
    assert (state["world_size"], state["batch_size_per_device"], state["samples_consumed"]) == (1, 4, 4 * STEPS), \
        f"the run did not end on one worker with the whole global batch: {state}"
    resumed = re.findall(r"\[cytoray\] resumed from \S+checkpoint_(\d+) at step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0][1]) >= 4, f"expected one resume from a checkpoint >= 4: {resumed}"
    assert f"1 workers x 4 images; steps {int(resumed[0][1])} -> {STEPS}" in log, "the resumed run is not 1 worker"

    # 4. same curve as the uninterrupted run: same data order, crops, masks and state at every step
    steps_ref, ref = _curve(tmp_path / "runs" / "reference")
    steps_got, got = _curve(tmp_path / "runs" / "elastic")
    assert steps_ref == steps_got == list(range(STEPS)), f"steps: reference {steps_ref}, elastic {steps_got}"
    np.testing.assert_allclose(got["lr"], ref["lr"], err_msg="lr schedule position differs")
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-4, err_msg="loss curve differs from the reference")


if __name__ == "__main__":
    _scenario(sys.argv[1], sys.argv[2])
