"""DINO projection head: 3-layer MLP -> bottleneck (256) -> L2-normalise -> weight-normalised prototypes.

Parameter names follow DINOv2 (``mlp.0/2/4``, ``last_layer.weight_g``/``weight_v``) so that DINOv2 and
DinoBloom training checkpoints keep their head weights. The weight norm is written out (not
``torch.nn.utils.weight_norm``) so that FSDP2 shards plain parameters. ``weight_g`` starts at 1 and is trained,
as in DINOv2's ``DINOHead``; ``freeze_weight_g`` keeps it at 1 (DINO v1's ``norm_last_layer=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """y = x @ (g * v / ||v||)^T, row-wise norm; no bias. ``freeze_g`` keeps every row's norm g at 1."""

    def __init__(self, in_dim: int, out_dim: int, freeze_g: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_g)
        nn.init.trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return F.linear(x, w)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, freeze_weight_g: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_weight_g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
