"""DINO loss on CLS prototypes (Caron et al. 2021; DINOv2, Oquab et al. 2023).

Teacher targets are either softmax((t - centre)/temp) with an EMA centre, or Sinkhorn-Knopp normalised
(3 iterations, as DINOv2 / SwAV) so that prototypes are used evenly over the global batch. The loss is the
cross-entropy between every student view and every teacher target, summed over pairs (the caller
weights global vs local pairs, see ``objective.py``). With ``fused_chunk_rows`` > 0 the cross-entropy runs in
row chunks without fp32 (B × K) copies of the student logits (``cross_entropy.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cytoray.platform.loss.cross_entropy import soft_cross_entropy
from cytoray.platform.loss.distributed import all_reduce_max, all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iterations: int = 3,
                   num_samples: torch.Tensor | int | None = None) -> torch.Tensor:
    """(B, K) logits -> (B, K) assignment whose rows sum to 1 and columns to B/K over the global batch.

    ``num_samples`` overrides the global B (iBOT passes the number of masked patches across ranks, which
    differs from rank to rank and may be zero on some). The logits are shifted by their *global* maximum
    before ``exp``: a constant shift cancels in the first normalisation and keeps ``exp`` finite, whereas a
    per-rank shift would weight each rank's rows by exp(-its own max) in the cross-rank sums (DINOv2 does not
    shift at all).
    """
    logits = teacher_logits.float() / temp  # the one fp32 (B, K) buffer: shift and exp below work in place
    local_max = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    shift = all_reduce_max(local_max.reshape(1).clone())
    q = logits.sub_(shift).exp_().t()  # (K, B)
    k = q.shape[0]
    b = num_samples if num_samples is not None else q.shape[1] * world_size()
    total = all_reduce_sum(q.sum().reshape(1))
    q /= total
    for _ in range(n_iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


class TeacherCentering(nn.Module):
    """EMA centre of teacher logits and the centred, sharpened teacher softmax (DINO v1 centring).

    The centre is the EMA of the global mean over all ranks; the count is all-reduced too, so it is right
    when ranks hold different numbers of rows (iBOT: masked patches per rank vary)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 fused_chunk_rows: int = 0):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.fused_chunk_rows = fused_chunk_rows  # 0: plain fp32 log_softmax; > 0: chunked soft_cross_entropy
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return F.softmax((teacher_logits - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the global batch mean of teacher logits (after the targets of this step are computed)."""
        n = all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        batch_sum = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_sum / n.clamp(min=1) * (1 - self.center_momentum))


class DINOLoss(TeacherCentering):
    def forward(self, student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor]) -> torch.Tensor:
        """Sum over (student view, teacher view) pairs of mean cross-entropy."""
        total = student_logits[0].new_zeros(())
        if self.fused_chunk_rows:
            # Σ_t −Σ t·lsm = −Σ (Σ_t t)·lsm: one cross-entropy per student view against the summed targets.
            targets = teacher_probs[0]
            for t in teacher_probs[1:]:
                targets = targets + t
            for s in student_logits:
                total = total + soft_cross_entropy(s, targets, self.student_temp, self.fused_chunk_rows).mean()
            return total
        for s in student_logits:
            lsm = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for t in teacher_probs:
                total = total - (t * lsm).sum(dim=-1).mean()
        return total
