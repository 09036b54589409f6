"""Transformer building blocks, named as in DINOv2 so that state dicts load unchanged.

Attention uses ``torch.nn.functional.scaled_dot_product_attention``; ``attn_impl="xformers"`` switches to
``xformers.ops.memory_efficient_attention`` when it is installed and the input is on CUDA (falls back to
SDPA otherwise, with a one-time warning). Blocks also take packed sequences of several crop sizes (one (T, D)
tensor, attention per crop: see ``Attention.forward``). No parallelism here: FSDP and checkpointing are applied from
outside (``cytoray.platform.parallelize``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
_XFORMERS_WARNED = False


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D) with a strided convolution (`patch_embed.proj`)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_impl: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.attn_impl = num_heads, attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor, seq_groups: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D). Packed: x (T, D) holds the tokens of several crop sizes back to back,
        ``seq_groups`` ((num_seqs, seq_len), ...) their layout; each sequence attends to its own tokens only
        (block-diagonal attention), and the projections run once over all T tokens."""
        if seq_groups is None:
            b, n, d = x.shape
            return self.proj(self._attend(self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads))
                             .reshape(b, n, d))
        d = x.shape[-1]
        qkv = self.qkv(x)  # (T, 3D)
        # Sequences of one crop size share a length, so the block-diagonal mask factorises into one dense
        # batched attention per crop size: no masked-out FLOPs, flash/fused kernels on every device.
        parts = qkv.split([n * t for n, t in seq_groups])
        out = [self._attend(part.view(n, t, 3, self.num_heads, d // self.num_heads)).reshape(n * t, d)
               for part, (n, t) in zip(parts, seq_groups)]
        return self.proj(torch.cat(out))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv (B, N, 3, H, Dh) -> attention output (B, N, H, Dh)."""
        if self.attn_impl == "xformers" and qkv.is_cuda and xformers_available():
            from xformers.ops import memory_efficient_attention

            return memory_efficient_attention(*qkv.unbind(2))  # (B, N, H, Dh): xformers' layout
        if self.attn_impl == "xformers":
            _warn_xformers_fallback()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def _warn_xformers_fallback() -> None:
    global _XFORMERS_WARNED
    if not _XFORMERS_WARNED:
        log.warning("attn_impl=xformers needs xformers and a CUDA input; using torch SDPA instead")
        _XFORMERS_WARNED = True


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv2's fused SwiGLU (ViT-g): w12 projects to 2×hidden, SiLU gate, w3 back.
    hidden = 2/3 of dim*mlp_ratio, rounded up to a multiple of 8 (as `SwiGLUFFNFused`)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


def drop_path(x: torch.Tensor, rate: float, training: bool, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Stochastic depth per sample (scaled so the expectation is unchanged). ``noise`` (B,) uniforms in [0, 1)
    decide which samples keep the branch (noise >= rate); without it, a Bernoulli draw from the global RNG.
    Training passes noise drawn per sample (``data/keys.py``), so a sample's drops do not depend on its rank."""
    if rate == 0.0 or not training:
        return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if noise is None:
        keep = x.new_empty(shape).bernoulli_(1 - rate)
    else:
        keep = (noise >= rate).to(x.dtype).view(shape)
    return x * keep / (1 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, ffn: str = "mlp",
                 layerscale: float | None = 1e-5, drop_path_rate: float = 0.0, attn_impl: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLUFFN(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, drop_noise: torch.Tensor | None = None,
                seq_groups: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        """x (B, T, D); ``drop_noise`` (B, 2): stochastic-depth uniforms for the attention and MLP branches.
        Packed (``seq_groups``, see ``Attention.forward``): x (T, D) and ``drop_noise`` (T, 2), each token
        carrying its sequence's uniforms, so every token of a sequence keeps or drops its branch together."""
        n_attn, n_mlp = (None, None) if drop_noise is None else drop_noise.unbind(-1)
        x = x + drop_path(self.ls1(self.attn(self.norm1(x), seq_groups)), self.drop_path_rate, self.training, n_attn)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path_rate, self.training, n_mlp)
