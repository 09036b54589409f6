"""Apply activation checkpointing, torch.compile and FSDP2 to a DINOv2 objective, in that fixed order.

The model code knows nothing about parallelism (torchtitan's split). Sharding units: every transformer
block, then each backbone / head (their remaining parameters: patch embedding, tokens, final norm, MLPs,
prototypes), then the objective itself as the root. The root matters: FSDP2 keeps a root module's
parameters unsharded after forward (it expects backward to need them next), and the teacher never runs
backward — as its own root, the teacher would stay gathered and the sharded EMA update would see full
tensors. One root above student and teacher reshards both.

``parallel.compile`` picks what ``torch.compile`` sees: ``blocks`` compiles each transformer block (graphs
between FSDP's per-block hooks); ``model`` compiles each backbone's ``forward_features`` whole (both crop
sizes) and each head, so the compiler also sees patch embedding, tokens, final norm and the code between blocks.
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
    # off | blocks (torch.compile each block) | model (each backbone's forward_features and each head whole);
    # true / false from older configs mean blocks / off. GPU; slow to warm up on CPU.
    compile: str = "off"
    reshard_after_forward: bool = True  # ZeRO-3; False keeps gathered params between forward and backward


COMPILE_MODES = ("off", "blocks", "model")


def compile_mode(value: str | bool) -> str:
    """``parallel.compile`` as one of COMPILE_MODES (true/false, as bool or as the string OmegaConf makes of it,
    are the older boolean switch: blocks/off)."""
    mode = {"true": "blocks", "false": "off"}.get(str(value).lower(), str(value).lower())
    if mode not in COMPILE_MODES:
        raise ValueError(f"parallel.compile must be one of {COMPILE_MODES} (or true/false), got {value!r}")
    return mode


def apply_activation_checkpointing(objective: DINOv2Objective) -> DINOv2Objective:
    """Recompute each student block in backward (the teacher has no backward). Composable API: parameter names,
    and so checkpoint keys, stay unchanged."""
    for block in objective.student["backbone"].blocks:
        checkpoint_activations(block)
    return objective


def apply_compile(objective: DINOv2Objective, mode: str) -> DINOv2Objective:
    """torch.compile student and teacher in place (before ``fully_shard``, after activation checkpointing).

    ``model``: ``dynamic=False`` for the backbones: training calls ``forward_features`` with three fixed
    shapes (student global crops with masks, student local crops, teacher global crops), three graphs under
    dynamo's recompile limit of 8. The heads see a varying number of masked patch tokens per step, so their
    batch dimension turns dynamic after the first change (``dynamic=None``) instead of recompiling every step.
    """
    mode = compile_mode(mode)
    for net in (objective.student, objective.teacher):
        backbone = net["backbone"]
        if mode == "blocks":
            for block in backbone.blocks:
                block.compile()
        elif mode == "model":
            backbone.forward_features = torch.compile(backbone.forward_features, dynamic=False)
            for name, head in net.items():
                if name != "backbone":
                    head.compile()
    return objective


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
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(objective)
    apply_compile(objective, cfg.compile)
    mp = mixed_precision_policy(cfg.mixed_precision, mesh.device_type)
    kwargs = {"mesh": mesh, "reshard_after_forward": cfg.reshard_after_forward}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for net in (objective.student, objective.teacher):
        backbone = net["backbone"]
        for block in backbone.blocks:
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
