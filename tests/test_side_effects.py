"""Library code leaves the process as it found it: no warning filters installed at import, no reseeded global
RNG, no mutated Ray Data context, no leftover environment variables."""

import subprocess
import sys

import numpy as np
import torch


def test_importing_every_module_installs_no_warning_filter_and_loads_no_pyplot_or_mlflow():
    code = """
import importlib, pkgutil, sys, warnings
installed = []
for name in ("filterwarnings", "simplefilter"):
    original = getattr(warnings, name)
    def record(*a, _original=original, **k):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("cytoray"):
            installed.append((caller, a, k))
        return _original(*a, **k)
    setattr(warnings, name, record)
import cytoray
for m in pkgutil.walk_packages(cytoray.__path__, "cytoray."):
    importlib.import_module(m.name)
assert not installed, installed
assert "matplotlib.pyplot" not in sys.modules
assert "mlflow" not in sys.modules  # imported only when tracking is on
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_random_backbones_and_abmil_leave_the_global_rng_alone():
    from cytoray.eval.mil import MILConfig, train_and_predict
    from cytoray.features.backbone import build_backbone

    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a, _ = build_backbone("random:vit_debug")
    b, _ = build_backbone("random:vit_debug")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    bags = [np.random.default_rng(i).normal(size=(5, 8)).astype(np.float32) for i in range(4)]
    train_and_predict(bags, np.array([0, 1, 0, 1]), bags[:1], 2, MILConfig(epochs=1))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_building_the_training_stream_leaves_the_global_data_context_alone(ray_local):
    from cytoray.platform.data.augment import AugmentConfig
    from cytoray.platform.data.stream import StreamConfig, build_stream

    ctx = ray_local.data.DataContext.get_current()
    before = (ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled)
    ds = build_stream(StreamConfig(manifest_uri="unused.parquet"), None, AugmentConfig(), seed=0, batch_size=2,
                      world_size=1, rank=0, start_step=0, end_step=3, start_samples=0)
    assert ds.context.execution_options.preserve_order and not ds.context.op_resource_reservation_enabled
    assert (ctx.execution_options.preserve_order, ctx.op_resource_reservation_enabled) == before
