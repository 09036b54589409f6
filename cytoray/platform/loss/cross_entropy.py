"""Memory-lean soft cross-entropy −Σ_k t·log_softmax(s/τ) for the 65,536-way prototype losses (issue 14).

The plain path (``F.log_softmax(s.float() / τ)``) keeps several fp32 (N × K) tensors alive: the upcast logits,
their log-softmax (saved for backward) and the product with the targets. Here the rows are processed in chunks
of ``chunk_rows``: each chunk is upcast, normalised by its logsumexp and reduced to one fp32 value per row, so
at most a (chunk_rows × K) fp32 block exists at a time. Backward recomputes the chunk's softmax from the saved
per-row logsumexp and writes the gradient in the logits' dtype: nothing beyond the logits, the targets and an
(N,) vector is kept between forward and backward, and bf16 logits are never upcast whole.
"""

from __future__ import annotations

import torch


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temp: float, chunk_rows: int) -> torch.Tensor:
        n = logits.shape[0]
        ce = logits.new_empty(n, dtype=torch.float32)
        lse = logits.new_empty(n, dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            x = logits[rows].float() / temp  # (c, K) fp32: the only full-width upcast, one chunk at a time
            lse[rows] = torch.logsumexp(x, dim=-1)
            x -= lse[rows].unsqueeze(-1)  # log_softmax, in place
            ce[rows] = -(targets[rows] * x).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temp, ctx.chunk_rows = temp, chunk_rows
        return ce

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        n = logits.shape[0]
        grad = torch.empty_like(logits)
        for start in range(0, n, ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, n))
            t = targets[rows].float()
            p = torch.exp(logits[rows].float() / ctx.temp - lse[rows].unsqueeze(-1))  # softmax(s/τ), (c, K)
            # d/ds of −Σ t·log_softmax(s/τ) = (softmax(s/τ)·Σt − t) / τ
            p.mul_(t.sum(-1, keepdim=True)).sub_(t).mul_((grad_ce[rows] / ctx.temp).unsqueeze(-1))
            grad[rows] = p.to(grad.dtype)
        return grad, None, None, None


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temp: float, chunk_rows: int) -> torch.Tensor:
    """(N, K) student logits (any float dtype), (N, K) target distributions -> (N,) fp32 −Σ_k t·log_softmax(s/τ)
    per row. Gradients flow to the logits only (the targets are the teacher's)."""
    return _SoftCrossEntropy.apply(logits.contiguous(), targets.detach(), temp, chunk_rows)
