"""Pretraining speed: DINOv2 step throughput / MFU per ViT size, and the input stream against a DataLoader.

    python benchmarks/train_step.py step [--archs vit_small,vit_base,vit_large] [--batch 32] [--steps 10]
        [--switches plain,compile=blocks,compile=model,fused_loss,ac[,pack]] [--time-budget 420] [--tiny]
    python benchmarks/train_step.py stream [--images 256] [--batch 16] [--steps 12] [--workers 1]

``step`` needs torch only (runs on the GPU image): one process, the real objective (student + EMA teacher,
DINO + iBOT + KoLeo) at the DinoBloom crop setting (2×224 + 8×98), in-memory batches, bf16 autocast on GPU
(no FSDP). One markdown table, a row per arch × switch set (``--switches``: plain, compile=blocks|model,
fused_loss, ac = activation checkpointing, pack = packed crops where the objective has ``pack_crops``):
step ms, img/s, MFU (model FLOPs from ``platform/flops.py``, as the training log line counts them, over the
device's dense bf16 peak; achieved GFLOP/s on CPU), peak memory and GPU busy fraction (profiled kernel time
over wall time of 3 steps); n/a on CPU. A switch that raises prints its error in its row; rows that would
overrun ``--time-budget`` are listed as skipped. ``--from-stream`` feeds the
same loop from files through the decode + multi-crop path to compare step times (needs Ray).

``stream`` (needs Ray): decode + multi-crop batches per second from a manifest of PNG cells, cytoray's
Ray Data stream (``build_stream``, ``--workers`` actors) against a torch DataLoader with the same
transforms and the same number of worker processes, in the same process; prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Switch sets of the step table (issue 14); "+" joins several: "fused_loss+compile=model".
DEFAULT_SWITCHES = "plain,compile=blocks,compile=model,fused_loss,ac"


def _switch_settings(spec: str) -> tuple[dict, str, bool]:
    """"fused_loss+compile=model" -> (ObjectiveConfig fields, parallel.compile mode, activation checkpointing)."""
    objective, compile_mode, checkpointing = {}, "off", False
    for token in spec.split("+"):
        if token == "plain":
            continue
        if token.startswith("compile="):
            compile_mode = token.split("=", 1)[1]
        elif token == "ac":
            checkpointing = True
        elif token == "fused_loss":
            objective["fused_loss"] = True
        elif token == "pack":
            objective["pack_crops"] = True
        else:
            raise SystemExit(f"unknown switch {token!r}: plain, compile=off|blocks|model, fused_loss, ac, pack")
    return objective, compile_mode, checkpointing


def _default_switches() -> str:
    """The default table, plus ``pack`` where the objective has a ``pack_crops`` switch."""
    from cytoray.platform.objective import ObjectiveConfig

    return DEFAULT_SWITCHES + (",pack" if hasattr(ObjectiveConfig(), "pack_crops") else "")


def _crops(tiny: bool) -> dict:
    """DinoBloom's crops (2x224 + 8x98, patch 14), or 2x56 + 2x28 with 512 prototypes for a CPU dry run."""
    if tiny:
        return {"n_global": 2, "n_local": 2, "size": 56, "local": 28, "patch": 14}
    return {"n_global": 2, "n_local": 8, "size": 224, "local": 98, "patch": 14}


def _objective(arch: str, device: torch.device, tiny: bool = False, **objective_fields):
    from cytoray.platform.models.vit import ViTConfig
    from cytoray.platform.objective import DINOv2Objective, ObjectiveConfig

    c = _crops(tiny)
    vit = ViTConfig(arch=arch, patch_size=c["patch"], img_size=c["size"],
                    drop_path_rate=0.1 if arch not in ("vit_small", "vit_debug") else 0.0)
    small = {"out_dim": 512, "ibot_out_dim": 512, "head_hidden_dim": 128, "head_bottleneck_dim": 64} if tiny else {}
    return vit, DINOv2Objective(vit, ObjectiveConfig(**small, **objective_fields)).to(device)


def _batch(b: int, device: torch.device, n_global=2, n_local=8, size=224, local=98, patch=14) -> dict:
    from cytoray.platform.data.keys import block_masks
    from cytoray.platform.data.masking import MaskingGenerator

    grid = (size // patch, size // patch)
    out = {"global_crops": torch.randn(n_global, b, 3, size, size), "local_crops": torch.randn(n_local, b, 3, local, local)}
    out.update(block_masks(0, 0, np.arange(b), np.arange(b), n_global, b, grid, (0.1, 0.5), 0.5, MaskingGenerator(grid)))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def _flops_per_image(vit, objective_cfg, tiny: bool) -> float:
    """Model FLOPs per image, counted as the training progress line counts them (``platform/flops.py``)."""
    from types import SimpleNamespace as NS

    from cytoray.platform.flops import train_flops_per_image

    c = _crops(tiny)
    augment = NS(global_crops=NS(size=c["size"], number=c["n_global"]), local_crops=NS(size=c["local"], number=c["n_local"]))
    return train_flops_per_image(vit, objective_cfg, augment, NS(mask_probability=0.5, mask_ratio=(0.1, 0.5)))


def _gpu_busy(run_steps, n: int) -> float:
    """Share of the wall time of ``n`` steps in which a CUDA kernel or copy runs (union of their intervals, from
    torch.profiler; the profiler's own overhead lowers it slightly)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_steps(n)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / wall_us


def _row(arch: str, spec: str, args, device: torch.device) -> str:
    """Build the objective with the switches of ``spec``, time ``--steps`` steps; one table row."""
    from cytoray.platform.flops import peak_flops
    from cytoray.platform.parallelize import apply_activation_checkpointing, apply_compile
    from cytoray.platform.step import build_optimizer, train_step

    objective_fields, compile_mode, checkpointing = _switch_settings(spec)
    cuda = device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    values = {"lr": 1e-4, "last_layer_lr": 1e-4, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.07}
    torch.manual_seed(0)
    vit, obj = _objective(arch, device, args.tiny, **objective_fields)
    if checkpointing:
        apply_activation_checkpointing(obj)
    apply_compile(obj, compile_mode)
    opt = build_optimizer(obj, 1.0, 0.2)
    batch = _batch(args.batch, device, **_crops(args.tiny))
    flops = _flops_per_image(vit, obj.cfg, args.tiny) * args.batch

    def run_steps(n: int) -> list[float]:
        times = []
        for i in range(n):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with amp:
                train_step(obj, opt, batch, values, 3.0, i)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    run_steps(3 if compile_mode != "off" else 2)  # warm-up: allocator, kernels, compilation
    step_t = float(np.median(run_steps(args.steps)))
    peak = peak_flops(device)
    achieved = flops / step_t
    mfu = f"{100 * achieved / peak:5.1f}%" if peak else f"n/a ({achieved / 1e9:.1f} GFLOP/s)"
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "n/a"
    busy = "n/a"
    if cuda:
        try:
            busy = f"{100 * _gpu_busy(run_steps, 3):.0f}%"
        except Exception as exc:  # the profiler is diagnostics: its failure must not cost the row
            busy = f"n/a ({type(exc).__name__})"
    return f"{step_t * 1e3:9.1f} | {args.batch / step_t:8.1f} | {mfu} | {mem} | {busy}"


def bench_step(args) -> None:
    """One table: a row per (arch, switch set); a switch that fails prints its error and the table goes on."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = _crops(args.tiny)
    switches = (args.switches or _default_switches()).split(",")
    for spec in switches:
        _switch_settings(spec)  # unknown names fail before the first row, not minutes into the table
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"batch {args.batch}/step, crops {c['n_global']}x{c['size']} + {c['n_local']}x{c['local']}"
          f"{' (--tiny: 512 prototypes)' if args.tiny else ', 65,536 prototypes'}; median of {args.steps} steps; "
          f"time budget {args.time_budget:.0f} s")
    print("| model | switches | step ms | img/s | MFU (dense bf16 peak) | peak memory | GPU busy |")
    print("|---|---|---|---|---|---|---|")
    t_start, longest = time.perf_counter(), 0.0
    signal.signal(signal.SIGALRM, _out_of_time)
    for arch in args.archs.split(","):
        for spec in switches:
            left = args.time_budget - (time.perf_counter() - t_start)
            if left < max(longest, 1.0):  # the next row could take as long as the longest so far
                print(f"| {arch} | {spec} | skipped: time budget ({args.time_budget:.0f} s) spent | | | | |")
                continue
            t0 = time.perf_counter()
            signal.alarm(int(left) + 1)  # a row that overruns (a long compilation) is stopped, not waited for
            try:
                row = _row(arch, spec, args, device)
            except Exception as exc:  # e.g. InductorError on a GPU image: report it, keep measuring the rest
                first = (str(exc).strip().splitlines() or [""])[0][:160].replace("|", "/")
                row = f"failed: {type(exc).__name__}: {first} | | | |"
            finally:
                signal.alarm(0)
            print(f"| {arch} | {spec} | {row} |", flush=True)
            longest = max(longest, time.perf_counter() - t0)
            _release(device)


def _out_of_time(signum, frame):
    raise TimeoutError("stopped: the row ran past --time-budget")


def _release(device: torch.device) -> None:
    """Drop compiled graphs and cached blocks so the next row starts clean (and its peak memory is its own)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class _StepDataset(torch.utils.data.Dataset):
    """DataLoader baseline: item k = step k's decoded, multi-cropped batch (the same work as the stream)."""

    def __init__(self, manifest: str, batch: int, steps: int, seed: int = 0):
        from cytoray.platform.config import load_preset

        self.steps, self.fn = steps, None
        self.args = dict(manifest_uri=manifest, storage_cfg=None, augment=load_preset("debug", _DINOBLOOM_CROPS).augment,
                         seed=seed, batch_size=batch, world_size=1, rank=0, start_step=0, start_samples=0)

    def __len__(self):
        return self.steps

    def __getitem__(self, k):
        from cytoray.platform.data.stream import MultiCropBatches

        if self.fn is None:  # built in the worker process, like the Ray actor
            self.fn = MultiCropBatches(**self.args)
        out = self.fn({"step": np.array([k])})
        return {key: torch.from_numpy(v[0]) for key, v in out.items() if key not in ("step", "worker")}


_DINOBLOOM_CROPS = ["augment.global_crops.size=224", "augment.local_crops.size=98", "augment.local_crops.number=8"]


def bench_stream(args) -> None:
    import ray

    from cytoray.platform.config import load_preset
    from cytoray.platform.data.stream import StreamConfig, build_stream, iter_steps
    from cytoray.testing import write_cell_manifest

    tmp = tempfile.mkdtemp(prefix="cytoray-bench-")
    manifest = write_cell_manifest(tmp, args.images)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    aug = load_preset("debug", _DINOBLOOM_CROPS).augment
    print(f"{args.steps} steps x {args.batch} images (2x224 + 8x98 crops), {args.workers} worker process(es), "
          f"{os.cpu_count()} cores")

    import psutil

    def tree_cpu() -> float:
        """CPU seconds of this process and all its descendants (Ray's daemons and workers, DataLoader workers)."""
        total = 0.0
        for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def timed(it):
        """(wall incl. start-up, batches/s and CPU ms per batch over the process tree, both from batch 5 on).
        Steady state starts at batch 5: the first batches carry the workers' start-up and fill the prefetch."""
        t0, n, marks = time.perf_counter(), 0, []
        for _ in it:
            n += 1
            if n in (5, args.steps):
                marks.append((time.perf_counter(), tree_cpu()))
        (ta, ca), (tb, cb) = marks
        return tb - t0, (n - 5) / (tb - ta), 1000 * (cb - ca) / (n - 5)

    results = {}
    for _rep in range(args.reps):  # interleaved passes: load from elsewhere hits both sides alike
        loader = torch.utils.data.DataLoader(_StepDataset(manifest, args.batch, args.steps), batch_size=None,
                                             num_workers=args.workers, prefetch_factor=2, persistent_workers=True)
        results.setdefault("dataloader", []).append(timed(loader))
        del loader
        ds = build_stream(StreamConfig(manifest_uri=manifest, num_actors=args.workers, num_cpus=1.0), None, aug,
                          0, args.batch, 1, 0, 0, args.steps, 0)
        results.setdefault("ray_data", []).append(timed(iter_steps(ds, prefetch_batches=2)))
    med = {name: [float(np.median([r[i] for r in runs])) for i in range(3)] for name, runs in results.items()}
    for name, (wall, steady, cpu) in med.items():
        print(f"{name:10s} wall {wall:6.2f} s  steady {steady:6.2f} batches/s = {steady * args.batch:6.1f} img/s  "
              f"CPU {cpu:5.0f} ms/batch (median of {args.reps}; passes: "
              f"{', '.join(f'{r[1]:.2f}' for r in results[name])} b/s)")
    ratios = [r[1] / d[1] for r, d in zip(results["ray_data"], results["dataloader"])]
    print(f"ratio ray_data / dataloader (steady): median {np.median(ratios):.2f}x (pairs: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}); wall: {med['dataloader'][0] / med['ray_data'][0]:.2f}x")
    ray.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("step")
    s.add_argument("--archs", default="vit_small,vit_base,vit_large")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--switches", default=None,
                   help=f"comma-separated switch sets, '+' joins several (default: {DEFAULT_SWITCHES}[,pack])")
    s.add_argument("--time-budget", type=float, default=420.0,
                   help="seconds for the whole table; rows that would not fit are listed as skipped")
    s.add_argument("--tiny", action="store_true", help="2x56 + 2x28 crops and 512 prototypes: a CPU dry run")
    r = sub.add_parser("stream")
    r.add_argument("--images", type=int, default=256)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--reps", type=int, default=3, help="interleaved DataLoader / Ray Data passes (medians printed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1) if args.mode == "step" else None
    bench_step(args) if args.mode == "step" else bench_stream(args)


if __name__ == "__main__":
    main()
