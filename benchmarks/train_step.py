"""Pretraining speed: DINOv2 step throughput / MFU per ViT size, and the input stream against a DataLoader.

    python benchmarks/train_step.py step [--archs vit_small,vit_base,vit_large] [--batch 32] [--steps 10] [--pack]
    python benchmarks/train_step.py stream [--images 256] [--batch 16] [--steps 12] [--workers 1]

``step`` needs torch only (runs on the GPU image): one process, the real objective (student + EMA teacher,
DINO + iBOT + KoLeo) at the DinoBloom crop setting (2×224 + 8×98), in-memory batches; prints images/s,
model FLOPs per image (counted by ``torch.utils.flop_counter`` on a forward+backward) and MFU against the
device's dense bf16 peak (GPU) — on CPU it prints achieved GFLOP/s instead. ``--from-stream`` feeds the
same loop from files through the decode + multi-crop path to compare step times (needs Ray). ``--pack`` adds
a row per arch with ``objective.pack_crops=true`` (global and local crops in one packed student pass).

``stream`` (needs Ray): decode + multi-crop batches per second from a manifest of PNG cells, cytoray's
Ray Data stream (``build_stream``, ``--workers`` actors) against a torch DataLoader with the same
transforms and the same number of worker processes, in the same process; prints the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

def _objective(arch: str, device: torch.device, pack_crops: bool = False):
    from cytoray.platform.models.vit import ViTConfig
    from cytoray.platform.objective import DINOv2Objective, ObjectiveConfig

    vit = ViTConfig(arch=arch, patch_size=14, img_size=224, drop_path_rate=0.1 if arch != "vit_small" else 0.0)
    return DINOv2Objective(vit, ObjectiveConfig(pack_crops=pack_crops)).to(device)


def _batch(b: int, device: torch.device, n_global=2, n_local=8, size=224, local=98, patch=14) -> dict:
    from cytoray.platform.data.keys import block_masks
    from cytoray.platform.data.masking import MaskingGenerator

    grid = (size // patch, size // patch)
    out = {"global_crops": torch.randn(n_global, b, 3, size, size), "local_crops": torch.randn(n_local, b, 3, local, local)}
    out.update(block_masks(0, 0, np.arange(b), np.arange(b), n_global, b, grid, (0.1, 0.5), 0.5, MaskingGenerator(grid)))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in out.items()}


def bench_step(args) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from cytoray.platform.flops import peak_flops
    from cytoray.platform.step import build_optimizer, train_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    values = {"lr": 1e-4, "last_layer_lr": 1e-4, "wd": 0.04, "momentum": 0.994, "teacher_temp": 0.07}
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"batch {args.batch}/step, DinoBloom crops 2x224 + 8x98")
    for arch in args.archs.split(","):
        arch, pack = arch.removesuffix("+pack"), arch.endswith("+pack")  # "+pack": rows added by --pack
        torch.manual_seed(0)
        obj = _objective(arch, device, pack)
        opt = build_optimizer(obj, 1.0, 0.2)
        batch = _batch(args.batch, device)
        with FlopCounterMode(display=False) as fc:  # model FLOPs of one forward+backward (student + teacher fwd)
            with amp:
                loss, _ = obj(batch, 0.07)
            loss.backward()
        flops = fc.get_total_flops()
        opt.zero_grad(set_to_none=True)
        times = []
        for i in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with amp:
                train_step(obj, opt, batch, values, 3.0, i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        step_t = float(np.median(times[2:]))  # first two: warm-up (allocator, kernels)
        achieved = flops / step_t / 1e12
        peak = peak_flops(device)
        peak = peak / 1e12 if peak else None
        mfu = f"MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s bf16" if peak else f"{achieved * 1e3:.1f} GFLOP/s"
        mem = f", peak mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        print(f"{arch + ('+pack' if pack else ''):15s} step {step_t * 1e3:8.1f} ms  {args.batch / step_t:8.1f} img/s  "
              f"{flops / args.batch / 1e9:7.1f} GFLOP/img  {mfu}{mem}", flush=True)
        del obj, opt, batch
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
        return {key: torch.from_numpy(v[0]) for key, v in out.items() if key != "step"}


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

    def timed(it):
        """(wall incl. start-up, batches/s from the first batch to the last: start-up excluded)."""
        t0, stamps = time.perf_counter(), []
        for _ in it:
            stamps.append(time.perf_counter())
        return stamps[-1] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    results = {}
    for _rep in range(2):  # second pass: warm processes
        loader = torch.utils.data.DataLoader(_StepDataset(manifest, args.batch, args.steps), batch_size=None,
                                             num_workers=args.workers, prefetch_factor=2, persistent_workers=False)
        results.setdefault("dataloader", []).append(timed(loader))
        ds = build_stream(StreamConfig(manifest_uri=manifest, num_actors=args.workers, num_cpus=1.0), None, aug,
                          0, args.batch, 1, 0, 0, args.steps, 0)
        results.setdefault("ray_data", []).append(timed(iter_steps(ds, prefetch_batches=2)))
    for name, runs in results.items():
        wall, steady = runs[-1]
        print(f"{name:10s} wall {wall:6.2f} s (first pass {runs[0][0]:.2f} s)  steady {steady:6.2f} batches/s "
              f"= {steady * args.batch:6.1f} img/s")
    ratio = results["ray_data"][-1][1] / results["dataloader"][-1][1]
    print(f"ratio ray_data / dataloader (steady, warm): {ratio:.2f}x; wall: "
          f"{results['dataloader'][-1][0] / results['ray_data'][-1][0]:.2f}x")
    ray.shutdown()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("step")
    s.add_argument("--archs", default="vit_small,vit_base,vit_large")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--pack", action="store_true", help="also time each arch with objective.pack_crops=true")
    r = sub.add_parser("stream")
    r.add_argument("--images", type=int, default=256)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    if args.mode == "step" and args.pack:  # each arch twice: separate student passes, then packed crops
        args.archs = ",".join(f"{a},{a}+pack" for a in args.archs.split(","))
    torch.set_num_threads(os.cpu_count() or 1) if args.mode == "step" else None
    bench_step(args) if args.mode == "step" else bench_stream(args)


if __name__ == "__main__":
    main()
