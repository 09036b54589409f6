"""KoLeo regulariser (Sablayrolles et al. 2019; DINOv2): -mean log distance to the nearest neighbour in the
batch, spreading features uniformly. ``eps`` guards log(0) when two samples coincide: DinoBloom raised it
from 1e-8 to 1e-4 after infinite losses on duplicated cells, so it is configurable."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x: (B, D) features of one view; returns a scalar."""
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # never pick yourself
        nn_idx = dots.argmax(dim=1)
    # The 1e-8 offset (as torch's PairwiseDistance) keeps the norm's gradient finite for exact duplicates.
    dist = (x - x[nn_idx] + 1e-8).norm(dim=-1)
    return -torch.log(dist + eps).mean()
