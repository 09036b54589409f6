"""The pretraining config schema (typed) and the presets that fill it (``cytoray/configs/*.yaml``).

Presets: ``dinobloom_s``/``_b``/``_l``/``_g`` carry DinoBloom's published hyperparameters (Koch et al.
2024) on DINOv2's defaults; ``debug`` is a tiny ViT for tests and the CPU demo. Derived values (scaled lr,
schedules) come from pure functions in ``schedules.py``, never from placeholders in the yaml.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cytoray import config as config_lib
from cytoray.eval.validation import EvalConfig
from cytoray.export.provenance import ExportConfig
from cytoray.platform import schedules
from cytoray.platform.data.augment import AugmentConfig
from cytoray.platform.data.stream import StreamConfig
from cytoray.platform.models.vit import ViTConfig
from cytoray.platform.objective import ObjectiveConfig
from cytoray.platform.parallelize import ParallelConfig, compile_mode
from cytoray.platform.tracking import TrackingConfig
from cytoray.runtime import RayConfig
from cytoray.storage import StorageConfig

PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class MaskConfig:
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # fraction of patches masked, spread over masked images
    mask_probability: float = 0.5  # share of global crops that get a mask
    min_num_patches: int = 4
    min_aspect: float = 0.3


@dataclass
class OptimConfig:
    base_lr: float = 2e-4  # scaled by lr_scaling with the total batch size
    lr_scaling: str = "sqrt_wrt_1024"
    min_lr: float = 1e-6
    warmup_iters: int = 1000
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.994
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup_iters: int = 3000
    freeze_last_layer_iters: int = 1250
    layer_decay: float = 1.0
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # max gradient L2 norm; 0: no clipping (norms are still logged)
    # submodule: backbone, DINO head and iBOT head each clipped on its own norm (DINOv2's rule);
    # global: one norm over all student parameters (docs/training.md, "Gradient clipping")
    clip_scope: str = "submodule"
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class ModelPreset:
    """The model side of a run, what a preset yaml (``cytoray/configs/<name>.yaml``) sets: backbone,
    objective, augmentation, masking, optimisation, run length and batch."""

    vit: ViTConfig = field(default_factory=ViTConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    total_iters: int = 125000
    batch_size_per_device: int = 32  # images per rank per step (each yields all global + local crops)
    # Images per step over all ranks. Set it to make the run independent of the number of workers (each takes
    # global_batch_size / workers; elastic runs need it); None: batch_size_per_device x train.num_workers.
    global_batch_size: int | None = None


def preset_path(name: str) -> str:
    path = os.path.join(PRESET_DIR, f"{name}.yaml")
    if not os.path.exists(path):
        names = sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))
        raise config_lib.ConfigError(f"unknown preset {name!r}; available: {names}")
    return path


def load_preset(name: str, overrides=(), schema=ModelPreset):
    """A validated preset with ``key=value`` overrides applied, as plain dataclasses."""
    return config_lib.to_object(config_lib.load_config(schema, preset_path(name), [], list(overrides)))


def make_schedules(p: ModelPreset, total_batch_size: int) -> schedules.Schedules:
    o = p.optim
    lr = schedules.scaled_lr(o.base_lr, total_batch_size, o.lr_scaling)
    return schedules.build_schedules(
        total_iters=p.total_iters, lr=lr, min_lr=o.min_lr, warmup_iters=min(o.warmup_iters, p.total_iters),
        wd=o.weight_decay, wd_end=o.weight_decay_end, momentum=o.momentum_teacher,
        momentum_end=o.final_momentum_teacher, teacher_temp=o.teacher_temp,
        warmup_teacher_temp=o.warmup_teacher_temp, teacher_temp_warmup_iters=o.teacher_temp_warmup_iters,
        freeze_last_layer_iters=min(o.freeze_last_layer_iters, p.total_iters))


@dataclass
class TrainConfig:
    """The Ray Train job: workers, checkpoint cadence, fault tolerance."""

    num_workers: Any = 8  # Ray Train workers (one per GPU); [min, max] for an elastic run (Ray Train V2)
    use_gpu: bool = True
    cpus_per_worker: float = 1.0  # fractional on small machines so data actors get CPUs (0.5 on 2 cores)
    label_selector: dict[str, str] = field(default_factory=dict)  # e.g. {cytoray-role: train}: the GPU nodes
    seed: int = 0  # model init, data order, augmentation and masks all derive from it
    max_steps: int | None = None  # stop after this step (schedules still span total_iters); None: total_iters
    log_every: int = 10  # console line + ray.train.report of metrics
    checkpoint_every: int = 1000  # sharded checkpoint (resume point)
    export_every: int = 5000  # teacher backbone in DinoBloom format to <run>/exports/; 0: only at the end
    keep_checkpoints: int = 3
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    skip_nonfinite: bool = False  # skip steps with a non-finite loss instead of stopping
    init_checkpoint: str | None = None  # DINOv2 / DinoBloom / cytoray backbone to start student and teacher from
    fail_at_step: int | None = None  # fault injection (tests): the last rank raises once at this step
    # after the last step: the final teacher for transformers / timm / DinoBloom with a model card, in
    # <run>/exports/final/<format>/ (docs/export.md); [] for none
    final_export: list[str] = field(default_factory=lambda: ["hf", "timm", "dinobloom"])


def worker_range(t: TrainConfig) -> tuple[int, int]:
    """(min, max) workers: equal for a fixed-size run; validated here, so a bad value fails at start-up."""
    n = t.num_workers
    if isinstance(n, int) and not isinstance(n, bool):
        lo = hi = n
    elif isinstance(n, Sequence) and not isinstance(n, str) and len(n) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in n):
        lo, hi = n
    else:
        raise config_lib.ConfigError(f"train.num_workers must be an int or [min, max] (elastic), got {n!r}")
    if not 1 <= lo <= hi:
        raise config_lib.ConfigError(f"train.num_workers={list(n) if lo != hi else n}: need 1 <= min <= max")
    return lo, hi


def global_batch(p: ModelPreset, t: TrainConfig) -> int:
    """Images per step over all workers (what schedules and the sample order are a function of)."""
    lo, hi = worker_range(t)
    if p.global_batch_size is None:
        if lo != hi:
            raise config_lib.ConfigError(
                f"an elastic run (train.num_workers=[{lo}, {hi}]) needs model.global_batch_size, so that the "
                f"batch, the lr and the sample order stay the same when workers come and go")
        return p.batch_size_per_device * lo
    bad = [n for n in range(lo, hi + 1) if p.global_batch_size % n]
    if p.global_batch_size < 1 or bad:
        raise config_lib.ConfigError(
            f"model.global_batch_size={p.global_batch_size} must be a positive multiple of every worker count "
            f"the run may use ({lo}..{hi}); it is not divisible by {bad}. Pick a batch divisible by each, or "
            f"narrow train.num_workers")
    return p.global_batch_size


def per_worker_batch(p: ModelPreset, t: TrainConfig, world_size: int) -> int:
    return global_batch(p, t) // world_size if p.global_batch_size is not None else p.batch_size_per_device


@dataclass
class RunSpec:
    name: str = "???"  # a rerun with the same name and storage_path resumes from its last checkpoint
    storage_path: str = "runs"  # local directory or s3://bucket/prefix


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; what ``recipes/pretrain_vit*.py`` load."""

    preset: str = "dinobloom_l"  # cytoray/configs/<preset>.yaml fills `model`
    model: ModelPreset = field(default_factory=ModelPreset)
    data: StreamConfig = field(default_factory=StreamConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # probe every checkpoint while training runs
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # optional MLflow run
    export: ExportConfig = field(default_factory=ExportConfig)  # how train.final_export's model cards name paths
    run: RunSpec = field(default_factory=RunSpec)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    log_level: str = "INFO"


def load_pretrain_config(argv, preset: str, defaults: str | None = None, schema=None):
    """Layers: schema <- preset yaml (under ``model``) <- recipe defaults <- --config files <- key=value.

    ``preset=NAME`` on the command line (or in a --config file) picks another preset.
    """
    import yaml

    files, overrides = config_lib.split_cli(argv)
    for path in [defaults, *files]:
        if path and os.path.exists(path):
            preset = (yaml.safe_load(open(path)) or {}).get("preset", preset)
    for item in overrides:
        if item.startswith("preset="):
            preset = item.split("=", 1)[1]
    with open(preset_path(preset)) as f:
        model = yaml.safe_load(f) or {}
    cfg = config_lib.load_config(schema or PretrainConfig, defaults, files, overrides,
                                 base=[(preset_path(preset), {"preset": preset, "model": model})])
    worker_range(cfg.train)  # an int or [min, max]: typed as Any in the schema, so checked here
    compile_mode(cfg.parallel.compile)  # off | blocks | model (or the older true/false): fail before workers start
    return cfg


def eval_preprocess(model: ModelPreset):
    """How evaluation prepares images for this run's backbone: its training normalisation at the global-crop size.
    Recorded in every checkpoint and export (``preprocess``), so probes and embedders read it back."""
    from cytoray.features.preprocess import Preprocess

    a = model.augment
    return Preprocess(size=a.global_crops.size, mean=tuple(a.mean), std=tuple(a.std))
