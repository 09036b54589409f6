"""Cross-rank hooks the losses need; identities outside torch.distributed, so the objective runs unchanged in
one process. Every reduction here is exact: a loss computed with them on N ranks equals the loss of one
process on the concatenated global batch (tests/platform/test_rank_equivalence.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (identity on one process); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """In-place maximum across ranks (identity on one process); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's (n, ...) rows in rank order; backward hands each rank the gradient of its own
    rows summed over all ranks' losses (FSDP's gradient averaging then gives the global-batch mean)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(n, ...) rows of this rank -> ((world·n, ...) rows of all ranks in rank order, offset of this rank's rows).
    Differentiable; every rank must hold the same number of rows (the per-rank batch)."""
    if not is_distributed() or world_size() == 1:
        return x, 0
    return _GatherRows.apply(x), rank() * x.shape[0]
