"""One DINOv2 step on N gloo ranks versus one process, on the same global batch: the check every change to
what crosses ranks (losses, centring, Sinkhorn-Knopp, KoLeo, grad clipping, metrics, EMA) must pass.

``run_step(world, overrides)`` spawns ``world`` CPU processes (gloo over 127.0.0.1), shards the objective
with FSDP2 exactly as training does (``apply_fsdp``, fp32), gives rank ``r`` its slice of the global batch
and runs ``step.train_step``; ``world=0`` runs the same step in this process without torch.distributed or
FSDP. Each returns what a step produces — teacher targets (as global-batch tensors), loss terms, the
clipped gradients, student and EMA teacher parameters after AdamW, loss centres — so a test compares them
key by key. Also usable on a new cluster image as a quick numerical self-check.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from cytoray.platform.data.batch import SampleDraws
from cytoray.platform.data.keys import mask_fields
from cytoray.platform.models.vit import ARCHS

GLOBAL_BATCH = 8  # samples; world sizes 1, 2, 4 divide it
STEP_VALUES = {"lr": 2e-3, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.05, "last_layer_lr": 2e-3}
CLIP_GRAD = 0.5  # small enough that clipping is active for every part, so the full cross-rank norms matter


def build_global_batch(p, seed: int = 0, unmasked_tail: int = 2) -> dict:
    """A deterministic global batch for the debug preset: random crops, keyed masks and drop noise; the last
    ``unmasked_tail`` samples carry no masked patch (so at 4 ranks the last rank has none)."""
    g = torch.Generator().manual_seed(seed)
    a = p.augment
    n_g, n_l = a.global_crops.number, a.local_crops.number
    batch = {"global_crops": torch.randn(n_g, GLOBAL_BATCH, 3, a.global_crops.size, a.global_crops.size, generator=g),
             "local_crops": torch.randn(n_l, GLOBAL_BATCH, 3, a.local_crops.size, a.local_crops.size, generator=g)}
    draws = SampleDraws(a.global_crops.size, p.vit.patch_size, p.mask.mask_ratio, 1.0, p.mask.min_num_patches,
                        p.mask.min_aspect, ARCHS[p.vit.arch][1], p.vit.drop_path_rate)
    positions = np.arange(GLOBAL_BATCH)
    out = draws(seed, 0, positions, positions, GLOBAL_BATCH, n_g, n_l)
    masks = out["masks"].view(n_g, GLOBAL_BATCH, -1).clone()
    masks[:, GLOBAL_BATCH - unmasked_tail :] = False
    batch["masks"] = masks.flatten(0, 1)
    batch.update({k: v for k, v in out.items() if k.startswith("drop_noise")})
    return batch


def slice_batch(batch: dict, rank: int, world: int) -> dict:
    """Rank ``rank``'s share of a global batch: samples [rank·B/world, (rank+1)·B/world) of every crop, with
    mask indices and weights recomputed for the slice (as the training loop makes them)."""
    n_g, b_global = batch["global_crops"].shape[:2]
    b = b_global // world
    part = slice(rank * b, (rank + 1) * b)
    masks = batch["masks"].view(n_g, b_global, -1)[:, part].flatten(0, 1)
    out = {"global_crops": batch["global_crops"][:, part].contiguous(),
           "local_crops": batch["local_crops"][:, part].contiguous(), **mask_fields(masks)}
    for key, n in (("drop_noise_global", n_g), ("drop_noise_local", batch["local_crops"].shape[0])):
        if key in batch:
            out[key] = batch[key].view(n, b_global, *batch[key].shape[1:])[:, part].flatten(0, 1)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _one_step(overrides: list[str], rank: int, world: int, mesh) -> dict:
    """The step on this rank (``mesh`` None: one process, no FSDP). Returns rank-local records."""
    from cytoray.platform.config import load_preset
    from cytoray.platform.objective import DINOv2Objective
    from cytoray.platform.parallelize import ParallelConfig, apply_fsdp
    from cytoray.platform.step import build_optimizer, train_step

    p = load_preset("debug", overrides)
    batch = build_global_batch(p)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        objective = DINOv2Objective(p.vit, p.objective)
    names = [n for n, _ in objective.student.named_parameters()]
    if mesh is not None:
        apply_fsdp(objective, mesh, ParallelConfig(mixed_precision="fp32"))
    optimizer = build_optimizer(objective, p.optim.layer_decay, p.optim.patch_embed_lr_mult)
    record: dict = {}
    teacher_targets = objective.teacher_targets

    def recording_targets(*args, **kwargs):
        cls_t, patch_t = teacher_targets(*args, **kwargs)
        record["teacher_cls"], record["teacher_patch"] = cls_t.detach().clone(), patch_t.detach().clone()
        return cls_t, patch_t

    objective.teacher_targets = recording_targets
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: record.update(
        grads={n: _full(q.grad) for n, q in objective.student.named_parameters() if q.grad is not None}))
    local = slice_batch(batch, rank, max(world, 1))
    metrics = train_step(objective, optimizer, local, STEP_VALUES, CLIP_GRAD, step=0, clip_scope=p.optim.clip_scope)
    b = local["masks"].shape[0] // p.augment.global_crops.number
    record["patch_crop"] = torch.repeat_interleave(torch.arange(local["masks"].shape[0]) // b,
                                                   local["masks"].sum(-1))  # crop index of each masked patch
    record["metrics"] = metrics
    record["student"] = {n: _full(q) for n, q in zip(names, objective.student.parameters())}
    record["teacher"] = {n: _full(q) for n, q in objective.teacher.named_parameters()}
    record["centres"] = {"dino": objective.dino_loss.center.clone(), "ibot": objective.ibot_loss.center.clone()}
    record["n_global"] = p.augment.global_crops.number
    return record


def _merge(records: list[dict], world: int) -> dict:
    """Per-rank records -> global-batch tensors (targets in single-process row order) and rank 0's rest."""
    out = dict(records[0])
    n_g = out["n_global"]
    cls = [r["teacher_cls"].view(n_g, -1, r["teacher_cls"].shape[-1]) for r in records]
    out["teacher_cls"] = torch.cat(cls, dim=1).flatten(0, 1)  # crop-major over the global batch
    # masked-patch rows: crop g of every rank in rank order is crop g of the global batch in sample order
    patches = []
    for g in range(n_g):
        for r in records:
            patches.append(r["teacher_patch"][r["patch_crop"] == g])
    out["teacher_patch"] = torch.cat(patches)
    # loss terms are per-rank means over equal per-rank batches: the global value is their mean
    out["metrics"] = {k: float(np.mean([r["metrics"][k] for r in records])) for k in records[0]["metrics"]}
    out["grad_norms_per_rank"] = [{k: v for k, v in r["metrics"].items() if k.startswith("grad_")} for r in records]
    out["world"] = world
    return out


def _worker(rank: int, world: int, port: int, configs: list[list[str]], out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = [_one_step(overrides, rank, world, mesh) for overrides in configs]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_step(world: int, configs: list[list[str]]) -> list[dict]:
    """One step per config (preset ``debug`` + overrides) on ``world`` gloo ranks (0: this process, no
    torch.distributed); one merged record per config."""
    if world == 0:
        return [_one_step(c, 0, 0, None) for c in configs]
    if GLOBAL_BATCH % world:
        raise ValueError(f"world size {world} does not divide the global batch of {GLOBAL_BATCH}")
    import torch.multiprocessing as mp

    from cytoray.runtime import free_port

    with tempfile.TemporaryDirectory(prefix="cytoray-ranks-") as out_dir:
        mp.start_processes(_worker, args=(world, free_port(), configs, out_dir), nprocs=world, join=True,
                           start_method="spawn")
        per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return [_merge([ranks[i] for ranks in per_rank], world) for i in range(len(configs))]
