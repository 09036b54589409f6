"""What the exporters share: a backbone's description read off the built model, and the safetensors writer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cytoray.platform.models.layers import SwiGLUFFN
from cytoray.platform.models.vit import VisionTransformer


@dataclass(frozen=True)
class BackboneSpec:
    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    grid: int  # side of the stored pos_embed grid: grid * grid patch positions (+ CLS)
    num_register_tokens: int
    swiglu: bool
    ffn_hidden: int  # MLP hidden width; SwiGLU: the width of each of its two branches
    layerscale: float  # LayerScale init value of the run; 0: no LayerScale
    interpolate_offset: float  # how cytoray resizes the pos_embed for other input sizes (see vit.resize_pos_embed)
    interpolate_antialias: bool
    num_params: int

    @property
    def img_size(self) -> int:
        """Input side (px) at which the stored pos_embed is used as is, without interpolation."""
        return self.grid * self.patch_size


def describe(model: VisionTransformer) -> BackboneSpec:
    mlp = model.blocks[0].mlp
    swiglu = isinstance(mlp, SwiGLUFFN)
    return BackboneSpec(
        arch=model.cfg.arch, embed_dim=model.embed_dim, depth=model.n_blocks, num_heads=model.num_heads,
        patch_size=model.patch_size, grid=math.isqrt(model.pos_embed.shape[1] - 1),
        num_register_tokens=model.num_register_tokens, swiglu=swiglu,
        ffn_hidden=mlp.w3.in_features if swiglu else mlp.fc1.out_features,
        layerscale=float(model.cfg.layerscale or 0.0), interpolate_offset=float(model.cfg.interpolate_offset),
        interpolate_antialias=bool(model.cfg.interpolate_antialias),
        num_params=sum(p.numel() for p in model.parameters()))


def resizes_like(spec: BackboneSpec, antialias: bool) -> bool:
    """Whether a library that resizes the pos_embed bicubically to the exact target grid (no offset) with
    ``antialias`` gives cytoray's positional embeddings at input sizes other than ``img_size``."""
    return spec.interpolate_offset == 0 and spec.interpolate_antialias == antialias


def safetensors_bytes(sd: dict[str, torch.Tensor]) -> bytes:
    """``model.safetensors`` content: every tensor its own contiguous CPU copy (views of qkv share storage)."""
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}, metadata={"format": "pt"})
