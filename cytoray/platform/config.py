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


def make_schedules(p: ModelPreset, total_batch_size: int, length: int | None = None) -> schedules.Schedules:
    """lr, wd, teacher momentum and temperature, last-layer lr over ``length`` steps (default ``p.total_iters``).
    A shorter ``length`` compresses the whole schedule: the warm-ups and the last-layer freeze shrink by
    ``length / total_iters`` too, so a short run warms up, decays and ends where a full one does."""
    o = p.optim
    length = p.total_iters if length is None else length
    iters = lambda n: min(int(round(n * length / p.total_iters)), length)  # noqa: E731
    lr = schedules.scaled_lr(o.base_lr, total_batch_size, o.lr_scaling)
    return schedules.build_schedules(
        total_iters=length, lr=lr, min_lr=o.min_lr, warmup_iters=iters(o.warmup_iters),
        wd=o.weight_decay, wd_end=o.weight_decay_end, momentum=o.momentum_teacher,
        momentum_end=o.final_momentum_teacher, teacher_temp=o.teacher_temp,
        warmup_teacher_temp=o.warmup_teacher_temp, teacher_temp_warmup_iters=iters(o.teacher_temp_warmup_iters),
        freeze_last_layer_iters=iters(o.freeze_last_layer_iters))


@dataclass
class TrainConfig:
    """The Ray Train job: workers, checkpoint cadence, fault tolerance."""

    num_workers: Any = 8  # Ray Train workers (one per GPU); [min, max] for an elastic run (Ray Train V2)
    use_gpu: bool = True
    cpus_per_worker: float = 1.0  # fractional on small machines so data actors get CPUs (0.5 on 2 cores)
    label_selector: dict[str, str] = field(default_factory=dict)  # e.g. {cytoray-role: train}: the GPU nodes
    seed: int = 0  # model init, data order, augmentation and masks all derive from it
    max_steps: int | None = None  # stop after this step (schedules still span total_iters); None: total_iters
    # true: the schedules span max_steps instead of model.total_iters (warm-ups scaled alike), so a short run is a
    # whole schedule; off by default, as resuming with another max_steps would then change the schedules mid-run
    # (docs/training.md, "Short runs")
    schedule_to_max_steps: bool = False
    log_every: int = 10  # console line + ray.train.report of metrics
    checkpoint_every: int = 1000  # sharded checkpoint (resume point)
    export_every: int = 5000  # teacher backbone in DinoBloom format to <run>/exports/; 0: only at the end
    keep_checkpoints: int = 3
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    skip_nonfinite: bool = False  # skip steps with a non-finite loss instead of stopping
    init_checkpoint: str | None = config_lib.location_field()  # DINOv2 / DinoBloom / cytoray backbone to start student and teacher from
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
    storage_path: str = config_lib.location_field("runs")  # local directory or s3://bucket/prefix


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


def schedule_length(p: ModelPreset, t: TrainConfig) -> int:
    """Steps the schedules span: ``model.total_iters``, or ``train.max_steps`` when it is shorter and
    ``train.schedule_to_max_steps`` is set."""
    if t.schedule_to_max_steps and t.max_steps and t.max_steps < p.total_iters:
        return t.max_steps
    return p.total_iters


def short_run_notice(p: ModelPreset, t: TrainConfig) -> str | None:
    """One line for a run that stops before its schedules end (``train.max_steps`` < ``model.total_iters``
    without ``train.schedule_to_max_steps``): where the schedules stand then and how to give it a whole one."""
    if not t.max_steps or t.max_steps >= p.total_iters or t.schedule_to_max_steps:
        return None
    lr = make_schedules(p, 1024).lr  # the shape only: the lr scaling changes the scale, not where it stands
    at = lr[t.max_steps - 1] / lr.max()
    return (f"train.max_steps={t.max_steps} stops the run before its lr, weight decay, teacher momentum and "
            f"teacher temperature schedules end: they span model.total_iters={p.total_iters} steps (at step "
            f"{t.max_steps} the lr is at {at:.0%} of its peak); for a whole schedule in {t.max_steps} steps, "
            f"warm-ups included, add train.schedule_to_max_steps=true")


def chosen_preset(argv, preset: str, defaults: str | None = None) -> tuple[str, str | None]:
    """(the preset a run trains, where it was named): ``preset=`` on the command line wins over one in a --config
    file (the last file naming one), which wins over ``preset`` (origin None)."""
    import yaml

    files, overrides = config_lib.split_cli(argv)
    origin = None
    for path in [defaults, *files]:
        if path and os.path.exists(path):
            named = (yaml.safe_load(open(path)) or {}).get("preset")
            if named is not None:
                preset, origin = named, str(path)
    for item in overrides:
        if item.startswith("preset="):
            preset, origin = item.split("=", 1)[1], "the command line"
    return preset, origin


def preset_replaced(script: str, fixed: str, chosen: str, origin: str | None) -> str | None:
    """One line when a --config file or ``preset=`` replaces the preset a ``pretrain_vit*`` script stands for."""
    if chosen == fixed:
        return None
    return (f"{script} stands for preset {fixed}, but preset={chosen} from {origin} replaces it: this run trains "
            f"{chosen}. For another preset use python recipes/pretrain.py (preset={chosen} or a --config file naming it)")


def load_pretrain_config(argv, preset: str, defaults: str | None = None, schema=None):
    """Layers: schema <- preset yaml (under ``model``) <- recipe defaults <- --config files <- key=value.

    ``preset=NAME`` on the command line (or in a --config file) picks another preset.
    """
    import yaml

    files, overrides = config_lib.split_cli(argv)
    preset, _ = chosen_preset(argv, preset, defaults)
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
