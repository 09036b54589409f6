"""The DINOv2 objective: student and EMA teacher (backbone + heads) and the loss of one batch.

Teacher sees the global crops; the student sees the global crops with iBOT masks and the local crops.
Loss = w_dino·(DINO over local×global and global×other-global pairs) + w_ibot·iBOT(masked patches)
+ w_koleo·KoLeo(student global CLS). Weighting across crops follows DINOv2's ``forward_backward``:
both DINO terms are divided by the number of (student, teacher) pairs, the global term counts twice
(two teacher views), iBOT is scaled by 2 / n_global_crops. No parallelism or devices here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from cytoray.platform.loss.dino import DINOLoss, sinkhorn_knopp
from cytoray.platform.loss.distributed import all_reduce_sum
from cytoray.platform.loss.ibot import iBOTPatchLoss
from cytoray.platform.loss.koleo import KOLEO_SCOPES, koleo_loss
from cytoray.platform.models.heads import DINOHead
from cytoray.platform.models.vit import ViTConfig, build_vit


@dataclass
class ObjectiveConfig:
    out_dim: int = 65536  # DINO prototypes (DinoBloom / DINOv2: 65,536)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_freeze_weight_g: bool = False  # keep the prototypes' weight_g at 1 (DINO v1 norm_last_layer); DINOv2 trains it
    ibot_separate_head: bool = False
    ibot_out_dim: int = 65536
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    koleo_eps: float = 1e-4  # DinoBloom raised KoLeo's epsilon from 1e-8 after infinite losses
    koleo_scope: str = "global"  # neighbours searched in the global batch | rank (DINOv2: per GPU), see loss/koleo.py
    centering: str = "sinkhorn_knopp"  # sinkhorn_knopp | centering (EMA centre, DINO v1)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    # One student backbone pass over global and local crops: tokens of both sizes packed into one sequence,
    # attention block-diagonal per crop (DINOv2's packing). Same loss as separate passes; fewer, larger kernels.
    pack_crops: bool = False
    # Prototype cross-entropies in row chunks without fp32 (B × K) copies of the student logits (bf16 logits are
    # upcast one chunk at a time, loss/cross_entropy.py); the same loss as the plain path (issue 14).
    fused_loss: bool = False
    fused_loss_chunk_rows: int = 1024  # rows per chunk: a 1024 × 65,536 fp32 block is 256 MiB


class DINOv2Objective(nn.Module):
    def __init__(self, vit: ViTConfig, cfg: ObjectiveConfig):
        super().__init__()
        if cfg.centering not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"objective.centering must be sinkhorn_knopp or centering, got {cfg.centering!r}")
        if cfg.koleo_scope not in KOLEO_SCOPES:
            raise ValueError(f"objective.koleo_scope must be one of {KOLEO_SCOPES}, got {cfg.koleo_scope!r}")
        if cfg.fused_loss_chunk_rows < 1:
            raise ValueError(f"objective.fused_loss_chunk_rows must be >= 1, got {cfg.fused_loss_chunk_rows}")
        self.cfg = cfg
        backbone = build_vit(vit)
        dim = backbone.embed_dim
        student = {"backbone": backbone,
                   "dino_head": DINOHead(dim, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_nlayers,
                                         freeze_weight_g=cfg.head_freeze_weight_g)}
        if cfg.ibot_separate_head:
            student["ibot_head"] = DINOHead(dim, cfg.ibot_out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim,
                                            cfg.head_nlayers, freeze_weight_g=cfg.head_freeze_weight_g)
        self.student = nn.ModuleDict(student)
        # Teacher: same weights, no stochastic depth, never trained by gradients (EMA only).
        self.teacher = nn.ModuleDict({k: copy.deepcopy(v) for k, v in student.items()})
        for blk in self.teacher["backbone"].blocks:
            blk.drop_path_rate = 0.0
        self.teacher.requires_grad_(False)
        chunk_rows = cfg.fused_loss_chunk_rows if cfg.fused_loss else 0
        self.dino_loss = DINOLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum, chunk_rows)
        self.ibot_loss = iBOTPatchLoss(cfg.ibot_out_dim if cfg.ibot_separate_head else cfg.out_dim,
                                       cfg.student_temp, cfg.center_momentum, chunk_rows)

    def _heads(self, net: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor):
        if "ibot_head" in net:
            return net["dino_head"](cls), net["ibot_head"](patches)
        out = net["dino_head"](torch.cat([cls, patches]))
        return out[: cls.shape[0]], out[cls.shape[0] :]

    @torch.no_grad()
    def teacher_targets(self, global_crops: torch.Tensor, mask_indices: torch.Tensor, n_global: int,
                        teacher_temp: float, monitors: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_g*B, K) CLS targets with views swapped, (M, K) masked-patch targets; ``monitors`` (a dict) receives
        the teacher-side collapse monitors (``teacher_monitors``)."""
        out = self.teacher["backbone"].forward_features(global_crops)
        b = global_crops.shape[0] // n_global
        cls = out["x_norm_clstoken"].view(n_global, b, -1).roll(1, dims=0).flatten(0, 1)  # view i <- view i-1
        patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
        cls_logits, patch_logits = self._heads(self.teacher, cls, patches)
        if self.cfg.centering == "sinkhorn_knopp":
            cls_t = sinkhorn_knopp(cls_logits, teacher_temp)
            patch_t = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
        else:
            cls_t = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            patch_t = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            self.ibot_loss.update_center(patch_logits)
        if monitors is not None:
            monitors.update(teacher_monitors(cls, cls_logits, cls_t))
            if self.cfg.centering == "centering":
                monitors["teacher_center_norm"] = self.dino_loss.center.norm()
        return cls_t, patch_t

    def forward(self, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """batch: global_crops (G,B,3,S,S), local_crops (L,B,3,s,s), masks (G*B,N), mask_indices (M,),
        masks_weight (M,); optional drop_noise_global (G*B, depth, 2) and drop_noise_local (L*B, depth, 2):
        uniforms that decide the student's stochastic depth per crop (``data/keys.py`` draws them per sample,
        so they do not depend on how the global batch is split). Returns (loss, detached metrics)."""
        cfg = self.cfg
        n_g, n_l = batch["global_crops"].shape[0], batch["local_crops"].shape[0]
        globals_, locals_ = batch["global_crops"].flatten(0, 1), batch["local_crops"].flatten(0, 1)
        masks, idx = batch["masks"], batch["mask_indices"]
        monitors: dict[str, torch.Tensor] = {}
        teacher_cls, teacher_patch = self.teacher_targets(globals_, idx, n_g, teacher_temp, monitors)

        backbone, noise_g, noise_l = self.student["backbone"], batch.get("drop_noise_global"), batch.get("drop_noise_local")
        if cfg.pack_crops and n_l > 0:
            s_g, s_l = backbone.forward_features_list([globals_, locals_], [masks, None], [noise_g, noise_l])
        else:
            s_g, s_l = backbone.forward_features(globals_, masks=masks, drop_noise=noise_g), None
        s_g_cls = s_g["x_norm_clstoken"]
        s_patches = s_g["x_norm_patchtokens"].flatten(0, 1)[idx]
        s_g_logits, s_patch_logits = self._heads(self.student, s_g_cls, s_patches)

        n_pairs = (n_g - 1) * n_g + n_l * n_g
        metrics: dict[str, torch.Tensor] = {}
        loss = s_g_logits.new_zeros(())
        t_views = list(teacher_cls.chunk(n_g))
        if n_l > 0:
            if s_l is None:
                s_l = backbone.forward_features(locals_, drop_noise=noise_l)
            s_l_cls = s_l["x_norm_clstoken"]
            s_l_logits = self.student["dino_head"](s_l_cls)
            local = self.dino_loss(list(s_l_logits.chunk(n_l)), t_views) / n_pairs  # every local vs every global
            metrics["dino_local_loss"] = local.detach()
            loss = loss + cfg.dino_loss_weight * local
        glob = self.dino_loss([s_g_logits], [teacher_cls]) * 2 / n_pairs
        metrics["dino_global_loss"] = glob.detach()
        loss = loss + cfg.dino_loss_weight * glob
        if cfg.koleo_loss_weight:
            koleo = sum(koleo_loss(x, cfg.koleo_eps, cfg.koleo_scope) for x in s_g_cls.chunk(n_g))
            metrics["koleo_loss"] = koleo.detach()
            loss = loss + cfg.koleo_loss_weight * koleo
        if cfg.ibot_loss_weight:
            ibot = self.ibot_loss.forward_masked(s_patch_logits, teacher_patch, masks, batch.get("masks_weight"))
            ibot = ibot * 2 / n_g
            metrics["ibot_loss"] = ibot.detach()
            loss = loss + cfg.ibot_loss_weight * ibot
        metrics["loss"] = loss.detach()
        with torch.no_grad():  # collapse monitors: the teacher's (above) and the spread of student features
            metrics.update(monitors)
            metrics["student_feature_std"] = global_std(torch.nn.functional.normalize(s_g_cls.float(), dim=-1)).mean()
        return loss, metrics

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = m·teacher + (1-m)·student, parameter by parameter (works on sharded tensors too)."""
        s_params = [p for k, m in self.student.items() for p in m.parameters()]
        t_params = [p for k, m in self.teacher.items() for p in m.parameters()]
        torch._foreach_lerp_(t_params, [p.detach() for p in s_params], 1.0 - momentum)


@torch.no_grad()
def teacher_monitors(cls: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """What tells a collapsing or idle DINO objective apart, from the teacher's (R, D) CLS tokens, (R, K) prototype
    logits and (R, K) targets of this rank; global-batch figures, the same on every rank (issue 28):

    - ``teacher_entropy``: mean entropy of a target row (nats; log K: uniform targets, the DINO terms teach
      nothing; ~0: one-hot);
    - ``teacher_feature_std``: std over the global batch of the L2-normalised CLS token, mean over dims (~0: every
      image maps to one point, collapse);
    - ``teacher_logit_std``: std over the global batch of each prototype's logit relative to its row's mean logit,
      mean over prototypes (cosine units): the part of the logits that neither the row nor the column
      normalisation removes; tiny: the head answers every image alike, so Sinkhorn-Knopp or a centre leaves
      near-uniform targets at any temperature much above it;
    - ``prototype_usage``: distinct prototypes that are some row's argmax target, over min(K, rows) (1: every
      row its own prototype; 1 / rows: one prototype for all)."""
    p = targets.float().clamp_min(1e-12)
    counts = torch.zeros(targets.shape[1], dtype=torch.float64, device=targets.device)
    counts.index_add_(0, targets.argmax(-1), torch.ones(len(targets), dtype=torch.float64, device=targets.device))
    counts = all_reduce_sum(counts)
    return {"teacher_entropy": -(p * p.log()).sum(-1).mean(),
            "teacher_feature_std": global_std(torch.nn.functional.normalize(cls.float(), dim=-1)).mean(),
            "teacher_logit_std": global_std(logits.float() - logits.float().mean(-1, keepdim=True)).mean(),
            "prototype_usage": (counts > 0).sum() / counts.sum().clamp(max=counts.numel())}


def global_std(x: torch.Tensor) -> torch.Tensor:
    """(B, D) rows of this rank -> (D,) unbiased std over the rows of all ranks (the same value on every rank)."""
    stats = all_reduce_sum(torch.cat([x.new_tensor([x.shape[0]]), x.sum(0), x.square().sum(0)]))
    n, total, squares = stats[0], stats[1 : 1 + x.shape[1]], stats[1 + x.shape[1] :]
    return ((squares - total.square() / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()

