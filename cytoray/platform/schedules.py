"""Schedules and optimiser parameter groups as pure functions (DINOv2 conventions).

Every schedule is a NumPy array indexed by iteration: lr (linear warmup then cosine to min_lr), weight
decay (cosine), teacher momentum (cosine to 1), teacher temperature (linear warmup then constant), and
last-layer lr (zero for the first ``freeze_last_layer_iters``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn


def cosine_schedule(base: float, final: float, total_iters: int, warmup_iters: int = 0,
                    start_warmup: float = 0.0, freeze_iters: int = 0) -> np.ndarray:
    """[0]*freeze, linear start_warmup->base over warmup, then cosine base->final; length total_iters.

    Element-wise DINOv2's ``CosineScheduler``: the warmup includes its end point (its last step is at base).
    """
    if freeze_iters + warmup_iters > total_iters:
        raise ValueError(f"freeze ({freeze_iters}) + warmup ({warmup_iters}) exceed total iterations ({total_iters})")
    freeze = np.zeros(freeze_iters)
    warm = np.linspace(start_warmup, base, warmup_iters)
    n = total_iters - freeze_iters - warmup_iters
    t = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(n, 1)))
    return np.concatenate([freeze, warm, cos]).astype(np.float64)


def linear_warmup_constant(start: float, end: float, warmup_iters: int, total_iters: int) -> np.ndarray:
    """Teacher temperature: start -> end over warmup_iters (DINOv2: 0.04 -> 0.07 over 30 epochs), then end.

    As DINOv2's ``CosineScheduler(end, end, warmup_iters, warmup_iters, start)``: the last warmup step is at end,
    and a warmup longer than the run is cut, not compressed.
    """
    warm = np.linspace(start, end, warmup_iters)[:total_iters]
    return np.concatenate([warm, np.full(total_iters - len(warm), end)])


def scaled_lr(base_lr: float, total_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """DINOv2's scaling: lr = base_lr * sqrt(batch / 1024); ``linear_wrt_256`` for DINO v1's rule."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * total_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (sqrt_wrt_1024 | linear_wrt_256 | none)")


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    def at(self, it: int) -> dict[str, float]:
        it = min(it, len(self.lr) - 1)
        return {"lr": float(self.lr[it]), "wd": float(self.wd[it]), "momentum": float(self.momentum[it]),
                "teacher_temp": float(self.teacher_temp[it]), "last_layer_lr": float(self.last_layer_lr[it])}


def build_schedules(total_iters: int, lr: float, min_lr: float, warmup_iters: int, wd: float, wd_end: float,
                    momentum: float, momentum_end: float, teacher_temp: float, warmup_teacher_temp: float,
                    teacher_temp_warmup_iters: int, freeze_last_layer_iters: int) -> Schedules:
    lr_s = cosine_schedule(lr, min_lr, total_iters, warmup_iters)
    last = lr_s.copy()
    last[:freeze_last_layer_iters] = 0.0
    return Schedules(
        lr=lr_s, wd=cosine_schedule(wd, wd_end, total_iters),
        momentum=cosine_schedule(momentum, momentum_end, total_iters),
        teacher_temp=linear_warmup_constant(warmup_teacher_temp, teacher_temp, teacher_temp_warmup_iters, total_iters),
        last_layer_lr=last,
    )


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings/tokens, i+1 for block i, num_layers+1 for the rest (final norm, heads)."""
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        return 0
    if ".blocks." in f".{name}":
        after = name[name.index("blocks.") + len("blocks."):]
        return int(after.split(".")[0]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, num_layers: int, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                 ) -> list[dict]:
    """One group per parameter with lr/wd multipliers: layer-wise lr decay, patch-embed lr multiplier, no
    weight decay on biases, norms and LayerScale gammas; ``is_last_layer`` marks the DINO prototypes."""
    groups = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = layer_decay ** (num_layers + 1 - layer_id(name, num_layers))
        if "patch_embed" in name:
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or name.endswith(".gamma")  # as DINOv2
        groups.append({"params": [p], "name": name, "lr_multiplier": lr_mult, "wd_multiplier": 0.0 if no_wd else 1.0,
                       "is_last_layer": "last_layer" in name})
    return fuse_groups(groups)


def fuse_groups(groups: list[dict]) -> list[dict]:
    """Merge groups with identical multipliers (far fewer optimizer groups; same maths)."""
    fused: dict[tuple, dict] = {}
    for g in groups:
        key = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        if key not in fused:
            fused[key] = {"params": [], "names": [], "lr_multiplier": key[0], "wd_multiplier": key[1],
                          "is_last_layer": key[2]}
        fused[key]["params"] += g["params"]
        fused[key]["names"].append(g["name"])
    return list(fused.values())


def apply_schedule(optimizer, values: dict[str, float]) -> None:
    """Set each group's lr / weight decay from the schedule values and its multipliers."""
    for g in optimizer.param_groups:
        base = values["last_layer_lr"] if g.get("is_last_layer") else values["lr"]
        g["lr"] = base * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = values["wd"] * g.get("wd_multiplier", 1.0)
