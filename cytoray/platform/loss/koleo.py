"""KoLeo regulariser (Sablayrolles et al. 2019; DINOv2): -mean log distance to the nearest neighbour in the
batch, spreading features uniformly. ``eps`` guards log(0) when two samples coincide: DinoBloom raised it
from 1e-8 to 1e-4 after infinite losses on duplicated cells, so it is configurable.

Which batch: DINOv2 searches the neighbour among the samples of the same GPU, so its KoLeo term changes with
the per-GPU batch, i.e. with the number of GPUs. cytoray searches the whole global batch by default
(``scope="global"``: every rank gathers the others' features, gradients flow back to their owners), so a run
is the same on 1 or 64 ranks; ``scope="rank"`` reproduces DINOv2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cytoray.platform.loss.distributed import gather_rows

KOLEO_SCOPES = ("global", "rank")


def koleo_loss(x: torch.Tensor, eps: float = 1e-8, scope: str = "global") -> torch.Tensor:
    """x: (B, D) features of one view on this rank; returns a scalar (this rank's share of the global mean
    when ``scope="global"``: averaging it over ranks gives the global-batch value)."""
    if scope not in KOLEO_SCOPES:
        raise ValueError(f"KoLeo scope must be one of {KOLEO_SCOPES}, got {scope!r}")
    x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
    candidates, offset = gather_rows(x) if scope == "global" else (x, 0)  # (N, D), N = B·ranks or B
    n = x.shape[0]
    with torch.no_grad():
        dots = x @ candidates.t()  # (B, N)
        own = torch.arange(n, device=x.device)
        dots[own, own + offset] = -2.0  # never pick yourself
        nn_idx = dots.argmax(dim=1)
    # The 1e-8 offset (as torch's PairwiseDistance) keeps the norm's gradient finite for exact duplicates.
    dist = (x - candidates[nn_idx] + 1e-8).norm(dim=-1)
    return -torch.log(dist + eps).mean()
