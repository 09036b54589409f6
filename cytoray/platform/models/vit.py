"""Vision Transformer backbones with DINOv2's parameter names and shapes (ViT-S/B/L/G /14 + debug).

``cls_token`` (1,1,D), ``pos_embed`` (1,1+N,D), ``mask_token`` (1,D), ``register_tokens`` (1,R,D),
``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1|mlp.w12,...}``,
``norm.*`` — so DINOv2 hub weights and DinoBloom checkpoints load without renaming
(see ``checkpoints.py``). Positional embeddings are interpolated to any input size (bicubic, with
DINOv2's ``interpolate_offset`` and ``interpolate_antialias`` options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cytoray.platform.models.layers import Block, PatchEmbed


@dataclass
class ViTConfig:
    """Backbone architecture. ``arch`` picks width/depth/heads; the rest are options."""

    arch: str = "vit_small"  # vit_debug | vit_small | vit_base | vit_large | vit_giant2
    patch_size: int = 14
    img_size: int = 224  # size the positional embedding is stored at (DinoBloom: 224 -> 16x16+1)
    num_register_tokens: int = 0
    layerscale: float = 1e-5  # 0 disables LayerScale
    drop_path_rate: float = 0.0  # stochastic depth rate (per block, see drop_path_uniform)
    drop_path_uniform: bool = True  # same rate in every block (DINOv2); False: linear 0 -> rate over depth
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    attn_impl: str = "sdpa"  # sdpa | xformers (CUDA only; falls back to sdpa)


ARCHS = {  # name: (embed_dim, depth, num_heads, ffn)
    "vit_debug": (64, 2, 2, "mlp"),
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.arch not in ARCHS:
            raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {sorted(ARCHS)}")
        dim, depth, heads, ffn = ARCHS[cfg.arch]
        self.cfg, self.embed_dim, self.patch_size, self.num_heads = cfg, dim, cfg.patch_size, heads
        self.num_register_tokens = cfg.num_register_tokens
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, cfg.num_register_tokens, dim))
                                if cfg.num_register_tokens else None)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        rates = ([cfg.drop_path_rate] * depth if cfg.drop_path_uniform
                 else torch.linspace(0, cfg.drop_path_rate, depth).tolist())
        self.blocks = nn.ModuleList(
            Block(dim, heads, 4.0, ffn, cfg.layerscale or None, rates[i], cfg.attn_impl) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def init_weights(self) -> None:
        """DINOv2's init: trunc-normal(0.02) linears and pos_embed, tiny cls/register tokens."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            for ls in (blk.ls1, blk.ls2):
                if hasattr(ls, "gamma"):
                    ls.gamma.fill_(self.cfg.layerscale)

    def interpolate_pos_encoding(self, num_patches: int, h: int, w: int) -> torch.Tensor:
        """pos_embed resized to an (h/p)×(w/p) grid; identity when the grid already matches."""
        n_stored = self.pos_embed.shape[1] - 1
        h0, w0 = h // self.patch_size, w // self.patch_size
        if num_patches == n_stored and h0 == w0:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, (h0, w0), self.cfg.interpolate_offset,
                                self.cfg.interpolate_antialias)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """(B,3,H,W) -> (B, 1+R+N, D); masked patches (B,N bool) are replaced by the mask token."""
        h, w = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w).to(x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         drop_noise: torch.Tensor | None = None) -> dict:
        """Normalised CLS (B,D), register (B,R,D) and patch (B,N,D) tokens, plus the pre-norm sequence.

        ``drop_noise`` (B, depth, 2) uniforms decide stochastic depth per sample, block and branch (see
        ``layers.drop_path``); without it the global RNG does."""
        x = self.prepare_tokens(x, masks)
        for i, blk in enumerate(self.blocks):
            x = blk(x) if drop_noise is None else blk(x, drop_noise[:, i])
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1 : r + 1],
                "x_norm_patchtokens": x_norm[:, r + 1 :], "x_prenorm": x, "masks": masks}

    def forward_features_list(self, x_list: list[torch.Tensor], masks_list: list[torch.Tensor | None],
                              drop_noise_list: list[torch.Tensor | None] | None = None) -> list[dict]:
        """``forward_features`` for several crop sizes in one pass: what separate calls give, one dict per input.

        Each input (B_i,3,H_i,W_i) is embedded on its own (positional embedding at its grid, its masks); then
        all tokens are packed into one (T, D) sequence, T = sum B_i·(1+R+N_i), so the linear layers, norms and
        MLPs run once per block over every crop, and attention stays within each crop (block-diagonal, see
        ``Attention.forward``) — DINOv2's xformers packing of global and local crops, without xformers.
        ``drop_noise_list`` entries are (B_i, depth, 2) as in ``forward_features``; where one is missing and
        stochastic depth is active, per-sample uniforms come from the global RNG."""
        tokens = [self.prepare_tokens(x, m) for x, m in zip(x_list, masks_list)]  # (B_i, T_i, D)
        groups = tuple((t.shape[0], t.shape[1]) for t in tokens)
        x = torch.cat([t.flatten(0, 1) for t in tokens])  # (T, D)
        noise = None
        if self.training and any(blk.drop_path_rate > 0 for blk in self.blocks):
            drop_noise_list = drop_noise_list or [None] * len(tokens)
            noise = torch.cat([  # (T, depth, 2): each token carries its sequence's uniforms
                (u if u is not None else torch.rand(n, len(self.blocks), 2, device=x.device))
                [:, None].expand(n, t, -1, -1).flatten(0, 1)
                for u, (n, t) in zip(drop_noise_list, groups)])
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if noise is None else noise[:, i], groups)
        x_norm = self.norm(x)
        r, sizes = self.num_register_tokens, [n * t for n, t in groups]
        outs = []
        for x_i, xn_i, (n, t), m in zip(x.split(sizes), x_norm.split(sizes), groups, masks_list):
            x_i, xn_i = x_i.view(n, t, -1), xn_i.view(n, t, -1)  # (T_i, D) -> (B_i, 1+R+N_i, D)
            outs.append({"x_norm_clstoken": xn_i[:, 0], "x_norm_regtokens": xn_i[:, 1 : r + 1],
                         "x_norm_patchtokens": xn_i[:, r + 1 :], "x_prenorm": x_i, "masks": m})
        return outs

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of the last ``n`` blocks (or the listed block indices), as DINOv2's evaluation uses;
        ``reshape`` gives (B, D, H/p, W/p) maps laid out as the input image, also for non-square inputs."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.prepare_tokens(x)
        wanted = set(range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outs.append(x)
        if len(outs) != len(wanted):
            raise ValueError(f"asked for blocks {sorted(wanted)} of a {len(self.blocks)}-block model")
        if norm:
            outs = [self.norm(o) for o in outs]
        r = self.num_register_tokens
        cls = [o[:, 0] for o in outs]
        patches = [o[:, r + 1 :] for o in outs]
        if reshape:
            patches = [p.reshape(p.shape[0], *grid, p.shape[-1]).permute(0, 3, 1, 2).contiguous() for p in patches]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], interpolate_offset: float = 0.1,
                     antialias: bool = False) -> torch.Tensor:
    """(1, 1+M*M, D) -> (1, 1+h*w, D), bicubic on the patch grid; the CLS position is kept as is.

    With ``interpolate_offset`` > 0 the scale factor is (h + offset)/M as in DINOv2 (a workaround for
    floating-point rounding in ``interpolate``); the output size is checked either way.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:].float()
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    h, w = grid
    src = patch_pos.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if interpolate_offset:
        out = F.interpolate(src, scale_factor=((h + interpolate_offset) / m, (w + interpolate_offset) / m),
                            mode="bicubic", antialias=antialias)
    else:
        out = F.interpolate(src, size=(h, w), mode="bicubic", antialias=antialias)
    if out.shape[-2:] != (h, w):
        raise AssertionError(f"pos_embed resize produced {tuple(out.shape[-2:])}, wanted {(h, w)}")
    out = out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, out), dim=1)


def build_vit(cfg: ViTConfig | None = None, **overrides) -> VisionTransformer:
    """Build a backbone (on the current default device; use ``torch.device('meta')`` for shapes only)."""
    from dataclasses import replace

    cfg = replace(cfg or ViTConfig(), **overrides)
    return VisionTransformer(cfg)
