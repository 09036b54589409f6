"""Sharded training checkpoints (torch.distributed.checkpoint) and the gathered teacher export.

A checkpoint directory holds every rank's shard files (``__<rank>_0.distcp``), DCP's ``.metadata`` and
``train_state.json`` (step, samples consumed, epoch, world size, seed): model = student + teacher + the
loss centres (buffers), optimizer = AdamW moments and param groups. All other randomness is derived from
(seed, step, rank) or (seed, sample position), so these files are the whole state of a run. Under Ray
Train each rank writes only its own files into a local directory and ``ray.train.report`` merges the
directories in the run's storage.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from cytoray.platform.objective import DINOv2Objective

TRAIN_STATE = "train_state.json"


def save_sharded(path: str, objective: DINOv2Objective, optimizer: torch.optim.Optimizer, train_state: dict,
                 rank: int) -> None:
    """Collective: every rank writes its shards of model and optimizer into ``path``."""
    model_sd, optim_sd = get_state_dict(objective, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    if rank == 0:
        with open(os.path.join(path, TRAIN_STATE), "w") as f:
            json.dump(train_state, f, indent=1)


def load_sharded(path: str, objective: DINOv2Objective, optimizer: torch.optim.Optimizer) -> dict:
    """Collective: restore model and optimizer in place from ``path``; returns the train state."""
    with open(os.path.join(path, TRAIN_STATE)) as f:
        train_state = json.load(f)
    model_sd, optim_sd = get_state_dict(objective, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return train_state


def gather_teacher_backbone(objective: DINOv2Objective) -> dict[str, torch.Tensor]:
    """Collective: the teacher backbone's full state dict on CPU, materialised on rank 0 only (others get {}),
    parameter by parameter, so no rank ever holds more than its shards plus one full tensor on the GPU."""
    return get_model_state_dict(objective.teacher["backbone"],
                                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
