"""One optimisation step of the DINOv2 objective, shared by the single-process and Ray Train loops.

schedule values -> forward (teacher targets, student losses) -> non-finite check -> backward -> clip ->
step -> EMA teacher. Device- and parallelism-agnostic: FSDP-wrapped modules pass through unchanged.

Clipping follows DINOv2 (``dinov2/train/train.py``: ``for v in model.student.values():
v.clip_grad_norm_(cfg.optim.clip_grad)``): each student part — backbone, DINO head, iBOT head when separate —
is clipped on its own norm (``optim.clip_scope=submodule``). Under one global norm (``global``) the heads'
gradients, several times the backbone's early in training, would shrink the backbone's step as well.
"""

from __future__ import annotations

import warnings

import torch

from cytoray.platform import schedules
from cytoray.platform.loss.distributed import all_reduce_sum
from cytoray.platform.objective import DINOv2Objective

CLIP_SCOPES = ("submodule", "global")


class NonFiniteLossError(FloatingPointError):
    def __init__(self, step: int, metrics: dict):
        shown = {k: round(float(v), 4) for k, v in metrics.items()}
        super().__init__(f"non-finite loss at step {step}: {shown}. Lower optim.base_lr, raise objective.koleo_eps, "
                         f"or set train.skip_nonfinite=true to skip such steps")
        self.step = step


def build_optimizer(objective: DINOv2Objective, layer_decay: float, patch_embed_lr_mult: float,
                    betas=(0.9, 0.999)) -> torch.optim.Optimizer:
    groups = schedules.param_groups(objective.student, objective.student["backbone"].n_blocks, layer_decay,
                                    patch_embed_lr_mult)
    return torch.optim.AdamW(groups, lr=0.0, betas=betas)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a list of gradients as a plain tensor; with FSDP2's DTensor gradients the full (cross-rank)
    norm, the same on every rank."""
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def clip_gradients(parts: dict[str, torch.nn.Module], max_norm: float, scope: str = "submodule") -> dict[str, float]:
    """Clip the gradients of ``parts`` (name -> module) in place; returns the norms before clipping.

    ``submodule``: each part scaled to ``max_norm`` when its own norm exceeds it (DINOv2); ``global``: all parts
    by one factor from their joint norm (``torch.nn.utils.clip_grad_norm_`` over every parameter). ``max_norm``
    0 logs the norms and clips nothing. The factor is ``max_norm / (norm + 1e-6)`` capped at 1, as in PyTorch.
    Returns ``grad_norm`` (joint), ``grad_norm_<part>`` and ``grad_clipped_<part>`` (1.0 when the part's
    gradient was scaled down).
    """
    if scope not in CLIP_SCOPES:
        raise ValueError(f"optim.clip_scope must be one of {CLIP_SCOPES}, got {scope!r}")
    grads = {name: [p.grad for p in module.parameters() if p.grad is not None] for name, module in parts.items()}
    norms = {name: float(grad_norm(g)) for name, g in grads.items()}
    total = sum(n * n for n in norms.values()) ** 0.5
    out = {"grad_norm": total}
    for name, g in grads.items():
        norm = norms[name] if scope == "submodule" else total
        factor = min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0
        if factor < 1.0 and g:
            torch._foreach_mul_(g, factor)
        out[f"grad_norm_{name}"] = norms[name]
        out[f"grad_clipped_{name}"] = float(factor < 1.0)
    return out


def train_step(objective: DINOv2Objective, optimizer: torch.optim.Optimizer, batch: dict, values: dict,
               clip_grad: float, step: int, skip_nonfinite: bool = False,
               clip_scope: str = "submodule") -> dict[str, float] | None:
    """Returns float metrics (loss terms, gradient norms per student part), or None when a non-finite step was
    skipped (``skip_nonfinite``). ``clip_grad`` / ``clip_scope``: see ``clip_gradients``."""
    schedules.apply_schedule(optimizer, values)
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # scoped: the process's warning filters stay as they were
        # forward_features returns views of the normed tokens; nothing downstream writes into them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        loss, metrics = objective(batch, values["teacher_temp"])
    # Decided across ranks: one rank skipping backward while the others reduce gradients would hang.
    non_finite = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    if float(non_finite) > 0:
        if skip_nonfinite:
            return None
        raise NonFiniteLossError(step, metrics)
    loss.backward()
    norms = clip_gradients(dict(objective.student.items()), clip_grad, clip_scope)
    optimizer.step()
    objective.update_teacher(values["momentum"])
    return {**{k: float(v) for k, v in metrics.items()}, **norms}
