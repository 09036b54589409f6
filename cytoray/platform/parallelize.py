"""Apply activation checkpointing, torch.compile and FSDP2 to a DINOv2 objective, in that fixed order.

The model code knows nothing about parallelism (torchtitan's split). Sharding units: every transformer
block, then each backbone / head (their remaining parameters: patch embedding, tokens, final norm, MLPs,
prototypes), then the objective itself as the root. The root matters: FSDP2 keeps a root module's
parameters unsharded after forward (it expects backward to need them next), and the teacher never runs
backward — as its own root, the teacher would stay gathered and the sharded EMA update would see full
tensors. One root above student and teacher reshards both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from cytoray.platform.objective import DINOv2Objective


@dataclass
class ParallelConfig:
    """How the model is laid out on the workers (config on the component it affects)."""

    mixed_precision: str = "auto"  # auto: bf16 params / fp32 reduce on GPU, fp32 on CPU | bf16 | fp32
    activation_checkpointing: bool = False  # recompute each block in backward (memory for compute)
    compile: bool = False  # torch.compile each block (GPU; slow to warm up on CPU)
    reshard_after_forward: bool = True  # ZeRO-3; False keeps gathered params between forward and backward


def mixed_precision_policy(mode: str, device_type: str) -> MixedPrecisionPolicy | None:
    if mode == "auto":
        mode = "bf16" if device_type == "cuda" else "fp32"
    if mode == "fp32":
        return None
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    raise ValueError(f"parallel.mixed_precision must be auto, bf16 or fp32, got {mode!r}")


def apply_fsdp(objective: DINOv2Objective, mesh: DeviceMesh, cfg: ParallelConfig) -> DINOv2Objective:
    """Shard student and teacher in place (activation checkpointing and compile first); returns the objective."""
    mp = mixed_precision_policy(cfg.mixed_precision, mesh.device_type)
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for net in (objective.student, objective.teacher):
        backbone = net["backbone"]
        for block in backbone.blocks:  # composable APIs: parameter names (checkpoint keys) stay unchanged
            if cfg.activation_checkpointing and net is objective.student:
                checkpoint_activations(block)
            if cfg.compile:
                block.compile()
            fully_shard(block, **kwargs)
        fully_shard(backbone, **kwargs)
        for method in ("forward_features", "forward_features_list"):  # the objective calls these, not forward
            register_fsdp_forward_method(backbone, method)
        for name, head in net.items():
            if name != "backbone":
                fully_shard(head, **kwargs)
    fully_shard(objective, **kwargs)
    return objective


def local_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the full model) — how much sharding saves."""
    local = total = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, total
