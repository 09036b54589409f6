"""All-reduce hooks the losses need; no-ops outside torch.distributed (DINOv2's Sinkhorn-Knopp is not)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity on one process); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
