"""iBOT masked-patch loss (Zhou et al. 2022, as in DINOv2): student predicts the teacher's prototype
distribution for masked patches; each image's masked patches share weight 1/num_masked so that heavily
masked images do not dominate."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cytoray.platform.loss.cross_entropy import soft_cross_entropy
from cytoray.platform.loss.dino import TeacherCentering, sinkhorn_knopp
from cytoray.platform.loss.distributed import all_reduce_sum


def mask_weights(masks: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> weight per masked patch (1 / masked patches of its image), in masks.nonzero() order."""
    per_image = 1.0 / masks.sum(-1).clamp(min=1.0)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]


class iBOTPatchLoss(TeacherCentering):
    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        n = all_reduce_sum(torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device))
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations, num_samples=n)

    def forward_masked(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
        """student/teacher: (M, K) for the M masked patches of ``masks`` (B, N); mean over the B images."""
        if student_logits.shape[0] == 0:
            return student_logits.sum() * 0.0  # no masked patch this step: zero, but keep the graph
        weights = mask_weights(masks) if weights is None else weights
        if self.fused_chunk_rows:
            ce = soft_cross_entropy(student_logits, teacher_probs, self.student_temp, self.fused_chunk_rows)
            return (ce * weights).sum() / masks.shape[0]
        ce = (teacher_probs * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(-1)
        return -(ce * weights).sum() / masks.shape[0]

