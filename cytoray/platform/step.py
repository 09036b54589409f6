"""One optimisation step of the DINOv2 objective, shared by the single-process and Ray Train loops.

schedule values -> forward (teacher targets, student losses) -> non-finite check -> backward -> clip ->
step -> EMA teacher. Device- and parallelism-agnostic: FSDP-wrapped modules pass through unchanged.
"""

from __future__ import annotations

import warnings

import torch

from cytoray.platform import schedules
from cytoray.platform.loss.distributed import all_reduce_sum
from cytoray.platform.objective import DINOv2Objective


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


def train_step(objective: DINOv2Objective, optimizer: torch.optim.Optimizer, batch: dict, values: dict,
               clip_grad: float, step: int, skip_nonfinite: bool = False) -> dict[str, float] | None:
    """Returns float metrics, or None when a non-finite step was skipped (``skip_nonfinite``)."""
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
    params = [p for p in objective.student.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad) if clip_grad else torch.zeros(())
    optimizer.step()
    objective.update_teacher(values["momentum"])
    out = {k: float(v) for k, v in metrics.items()}
    out["grad_norm"] = float(grad_norm)
    return out
