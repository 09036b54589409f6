"""DINOv2 pretraining as a Ray Train job: ``train_loop_per_worker`` (read it top to bottom) and ``pretrain``.

Per worker, in a fixed order: device mesh -> model (same seed on every rank, optional DINOv2/DinoBloom
init) -> FSDP2 -> optimizer and schedules -> restore (sharded checkpoint: model, teacher, optimizer, loss
centres, data position) -> this rank's data stream -> loop. Per step: batch -> masks -> schedule values ->
forward/backward -> non-finite check -> clip -> step -> EMA teacher (``step.train_step``) -> log ->
report (+ sharded checkpoint every ``checkpoint_every`` steps, teacher export every ``export_every``; with
``eval.manifests`` the checkpoint is reported for validation: Ray Train probes it in a separate task while the
workers go on, see ``validation.py``).

Resuming needs nothing but the run's name: Ray Train hands the last reported checkpoint to restarted
workers (``FailureConfig``) and to a rerun of the driver with the same ``RunConfig(name, storage_path)``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import asdict

import torch

from cytoray import config as config_lib
from cytoray import console, manifest, storage
from cytoray.eval import validation
from cytoray.export.exporter import check_formats
from cytoray.export.provenance import check_card_paths
from cytoray.platform import checkpointing, tracking, training_report
from cytoray.platform.config import (
    PretrainConfig,
    eval_preprocess,
    make_schedules,
    per_worker_batch,
    schedule_length,
    short_run_notice,
    worker_range,
)
from cytoray.platform.config import global_batch as global_batch_size
from cytoray.platform.data.batch import SampleDraws
from cytoray.platform.data.stream import build_stream, expand_repeats, iter_steps, read_manifest
from cytoray.platform.flops import peak_flops, train_flops_per_image
from cytoray.platform.metrics import MetricsLog
from cytoray.platform.models.checkpoints import export_state_dict, load_pretrained_weights
from cytoray.platform.objective import DINOv2Objective
from cytoray.platform.parallelize import apply_fsdp, local_numel
from cytoray.platform.step import CLIP_SCOPES, build_optimizer, train_step

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised once by ``train.fail_at_step`` so tests can watch the run recover."""


def run_uri(cfg: PretrainConfig) -> str:
    return storage.join_uri(cfg.run.storage_path, cfg.run.name)


def end_step(cfg: PretrainConfig) -> int:
    return min(cfg.model.total_iters, cfg.train.max_steps or cfg.model.total_iters)


# ----------------------------------------------------------------------------------------------- worker side


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch.distributed.device_mesh import init_device_mesh

    cfg: PretrainConfig = config["cfg"]
    p, t = cfg.model, cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()  # world: any size in train.num_workers' range
    global_batch = global_batch_size(p, t)
    batch_size = per_worker_batch(p, t, world)

    # 1. device mesh over all workers (gloo on CPU, NCCL on GPU: Ray's TorchConfig set up the process group)
    device = ray.train.torch.get_device()
    mesh = init_device_mesh(device.type, (world,))

    # 2. model: identical full weights on every rank before sharding; optional pretrained backbone
    with torch.random.fork_rng(devices=[]):  # the init draws from the run's seed; the process RNG is untouched
        torch.manual_seed(t.seed)
        objective = DINOv2Objective(p.vit, p.objective)
    if t.init_checkpoint:
        init_backbones(objective, t.init_checkpoint, cfg.storage)
    objective.to(device)

    # 3. FSDP2: each block, each backbone/head, then the objective as root
    apply_fsdp(objective, mesh, cfg.parallel)

    # 4. optimizer and schedules (lr scaled with the global batch)
    optimizer = build_optimizer(objective, p.optim.layer_decay, p.optim.patch_embed_lr_mult,
                                (p.optim.adamw_beta1, p.optim.adamw_beta2))
    sched = make_schedules(p, global_batch, schedule_length(p, t))

    # 5. restore the last checkpoint: model, teacher, optimizer, loss centres, data position
    state = restore(objective, optimizer)
    start, last = state["step"], end_step(cfg)

    # 6. this rank's data: steps [start, last) from the saved sample position on
    ds = build_stream(cfg.data, cfg.storage, p.augment, t.seed, batch_size, world, rank,
                      start, last, state["samples_consumed"])
    draws = SampleDraws(p.augment.global_crops.size, p.vit.patch_size, p.mask.mask_ratio, p.mask.mask_probability,
                        p.mask.min_num_patches, p.mask.min_aspect, objective.student["backbone"].n_blocks,
                        p.vit.drop_path_rate)
    metrics_log = MetricsLog(run_uri(cfg), start, cfg.storage) if rank == 0 else None
    mlflow_log = tracking.MetricsSender(config["mlflow"]) if rank == 0 and config["mlflow"] else None
    if rank == 0:
        held, total = local_numel(objective)
        print(f"[cytoray] {p.vit.arch}: {total / 1e6:.1f}M parameters (student+teacher), rank 0 holds "
              f"{held / 1e6:.1f}M; {world} workers x {batch_size} images; steps {start} -> {last}",
              flush=True)

    flops = train_flops_per_image(p.vit, p.objective, p.augment, p.mask) if device.type == "cuda" else None
    peak = peak_flops(device)
    samples = state["samples_consumed"]
    wait_t, t_prev = 0.0, time.perf_counter()
    t_start = t_prev
    for step, batch in iter_steps(ds, cfg.data.prefetch_batches):
        wait_t = time.perf_counter() - t_prev
        maybe_inject_failure(cfg, step, rank, world)
        positions = batch.pop("positions").numpy()  # global sample positions: keys of every random draw
        batch.update(draws(t.seed, step, positions, positions - samples, global_batch, p.augment.global_crops.number,
                           p.augment.local_crops.number))
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        values = sched.at(step)

        metrics = train_step(objective, optimizer, batch, values, p.optim.clip_grad, step, t.skip_nonfinite,
                             p.optim.clip_scope)

        samples += global_batch
        step_t = time.perf_counter() - t_prev
        row = step_metrics(metrics, values, step_t, wait_t, global_batch, device)
        if flops and peak:
            row["mfu"] = flops * row["images_per_s"] / (peak * world)
        if metrics_log is not None:
            metrics_log.log(step, row)
        done = step + 1
        if done % t.log_every == 0 or done == last:
            if rank == 0:
                eta = (time.perf_counter() - t_start) / (done - start) * (last - done)
                print(progress_line(done, last, row, eta), flush=True)
            if mlflow_log is not None:
                mlflow_log.log(step, row)
        train_state = {"step": done, "samples_consumed": samples, "world_size": world,
                       "batch_size_per_device": batch_size, "global_batch": global_batch, "seed": t.seed, "preset": cfg.preset,
                       "epoch": samples // config["epoch_len"], "vit": asdict(p.vit),
                       "preprocess": eval_preprocess(p).record()}
        if done % t.checkpoint_every == 0 or done == last:
            if (t.export_every and done % t.export_every == 0) or done == last:
                export_teacher(objective, cfg, done, rank)
            if metrics_log is not None:
                metrics_log.sync()
            n_ckpt = done // t.checkpoint_every
            probe = bool(cfg.eval.manifests) and (n_ckpt % cfg.eval.every == 0 or done == last)
            extra = {validation.SCORE: math.nan} if cfg.eval.keep_best else {}  # filled in by the validation
            save_and_report(objective, optimizer, train_state, {**row, **extra, "step": done}, rank, probe)
        elif done % t.log_every == 0:
            ray.train.report({**row, "step": done})
        t_prev = time.perf_counter()
    if metrics_log is not None:
        metrics_log.close()
    if mlflow_log is not None:
        mlflow_log.close()


def init_backbones(objective, uri: str, storage_cfg) -> None:
    """Student and teacher backbones from a DINOv2 / DinoBloom / cytoray file (heads stay fresh)."""
    fmt = load_pretrained_weights(objective.student["backbone"], uri, storage_cfg)
    objective.teacher["backbone"].load_state_dict(objective.student["backbone"].state_dict())
    log.info("initialised backbones from %s (%s format)", storage.redact(uri), fmt)


def restore(objective, optimizer) -> dict:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"step": 0, "samples_consumed": 0}
    with ckpt.as_directory() as path:
        state = checkpointing.load_sharded(path, objective, optimizer)
    print(f"[cytoray] resumed from {ckpt.path} at step {state['step']} "
          f"({state['samples_consumed']} samples consumed)", flush=True)
    return state


def maybe_inject_failure(cfg: PretrainConfig, step: int, rank: int, world: int) -> None:
    """The last rank raises once at ``train.fail_at_step`` (a marker in the run dir makes it once)."""
    if cfg.train.fail_at_step is None or step != cfg.train.fail_at_step or rank != world - 1:
        return
    marker = storage.join_uri(run_uri(cfg), f"_injected_failure_step{step}")
    if storage.exists(marker, cfg.storage):
        return
    storage.write_bytes(marker, b"", cfg.storage)
    raise InjectedFailure(f"injected failure at step {step} on rank {rank} (train.fail_at_step)")


def step_metrics(metrics: dict | None, values: dict, step_t: float, wait_t: float, global_batch: int,
                 device: torch.device) -> dict[str, float]:
    """Loss terms averaged over ranks, schedule values, throughput, data wait (and GPU memory)."""
    from cytoray.platform.loss.distributed import all_reduce_sum, world_size

    row: dict[str, float] = {}
    if metrics is not None:
        keys = sorted(metrics)
        vec = all_reduce_sum(torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device))
        row.update({k: float(v) / world_size() for k, v in zip(keys, vec)})
    else:
        row["skipped_nonfinite"] = 1.0
    row.update(lr=values["lr"], wd=values["wd"], momentum=values["momentum"], teacher_temp=values["teacher_temp"])
    row.update(images_per_s=global_batch / max(step_t, 1e-9), step_time_s=step_t, data_wait_s=wait_t,
               data_wait_frac=wait_t / max(step_t, 1e-9))
    if device.type == "cuda":
        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def progress_line(done: int, last: int, row: dict, eta_s: float | None = None) -> str:
    """``[cytoray] step 250/300 loss 8.3252 lr 1.03e-06 131.7 img/s MFU 41% data-wait 0% ETA 1m05s``: the
    marker shows it on the driver's terminal (``cytoray.console``)."""
    loss = row.get("loss", math.nan)
    mfu = f" MFU {100 * row['mfu']:.0f}%" if "mfu" in row else ""
    eta = f" ETA {console.format_seconds(eta_s)}" if eta_s is not None and done < last else ""
    return (f"[cytoray] step {done}/{last} loss {loss:.4f} lr {row['lr']:.2e} "
            f"{row['images_per_s']:.1f} img/s{mfu} data-wait {100 * row['data_wait_frac']:.0f}%{eta}")


def save_and_report(objective, optimizer, train_state: dict, metrics: dict, rank: int, probe: bool = False) -> None:
    """Every rank writes its shards to a local dir; Ray merges the dirs in the run's storage (and, with
    ``probe``, queues the checkpoint for the validation task)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="cytoray-ckpt-") as tmp:
        checkpointing.save_sharded(tmp, objective, optimizer, train_state, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{train_state['step']:08d}", validation=probe)


def export_teacher(objective, cfg: PretrainConfig, step: int, rank: int) -> None:
    state = checkpointing.gather_teacher_backbone(objective)  # collective
    if rank == 0:
        uri = storage.join_uri(run_uri(cfg), "exports", f"teacher_{step:08d}.pth")
        export_state_dict(state, cfg.model.vit, uri, cfg.storage, extra={"step": step, "preset": cfg.preset,
                                                                             "preprocess": eval_preprocess(cfg.model).record()})
        print(f"exported teacher backbone (DinoBloom format) to {uri}", flush=True)  # log only


# ----------------------------------------------------------------------------------------------- driver side


def pretrain(cfg: PretrainConfig, callbacks=()):
    """Launch (or resume) the run ``cfg.run.name``; returns Ray Train's ``Result``. ``callbacks``: Ray Train
    ``UserCallback``s (the sweep passes Tune's ``TuneReportCallback``). Ends by writing ``<run>/training.html`` and,
    with ``tracking.mlflow``, completing the run's MLflow run (``tracking.py``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cytoray.runtime import init_ray

    cfg = config_lib.to_object(cfg)
    init_ray(cfg.ray)
    epoch_len = validate(cfg)
    notice = short_run_notice(cfg.model, cfg.train)
    if notice:
        console.say(notice)
    protocol, path = storage.split_protocol(cfg.run.storage_path)
    if protocol == "file":
        cfg.run.storage_path = os.path.abspath(path)
        fs = None
    else:
        fs, _ = storage.arrow_filesystem(cfg.run.storage_path, cfg.storage)
    config_lib.save_config(cfg, run_uri(cfg), cfg.storage)
    console.log_to(run_uri(cfg), cfg.storage)
    mlflow_run = tracking.start_run(cfg.tracking, run_uri(cfg), cfg.run.name, config_lib.to_dict(cfg))
    t = cfg.train
    workers = worker_range(t)  # (min, max): an elastic run when they differ
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    keep = ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints)
    if cfg.eval.keep_best and cfg.eval.manifests:
        keep = ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_order="max",
                                          checkpoint_score_attribute=validation.SCORE)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "epoch_len": epoch_len, "mlflow": mlflow_run},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers if workers[0] < workers[1] else workers[0],
                                               use_gpu=t.use_gpu, resources_per_worker=resources,
                                               label_selector=dict(t.label_selector) or None),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=path if fs is not None else cfg.run.storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=keep, callbacks=list(callbacks),
            # Ray Train's print patch echoes every worker print twice on the driver's console
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
        validation_config=validation.validation_config(cfg.eval, run_uri(cfg), cfg.storage),
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        end_of_run(cfg, mlflow_run, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if result.error is None and cfg.train.final_export:
        final_export(cfg)
    end_of_run(cfg, mlflow_run, "FINISHED" if result.error is None else "FAILED")
    return result


def final_export(cfg: PretrainConfig) -> dict[str, str]:
    """``train.final_export``: the run's last checkpoint in each format with its model card, in
    ``<run>/exports/final/``; a failure warns (the sharded checkpoints and teacher exports are there either way)."""
    from cytoray.export import export_run

    try:
        written = export_run(run_uri(cfg), formats=cfg.train.final_export, storage_cfg=cfg.storage,
                             card_paths=cfg.export.card_paths)
    except Exception as exc:  # noqa: BLE001 - a finished run stays finished
        log.warning("final export to %s failed: %s", storage.join_uri(run_uri(cfg), "exports", "final"), exc)
        return {}
    log.info("final export: %s", written)
    return written


def end_of_run(cfg: PretrainConfig, mlflow_run: dict | None, status: str) -> None:
    """``training.html``, and with tracking on the MLflow run's probe scores, artifacts and status; neither can
    fail a finished run."""
    run = run_uri(cfg)
    try:
        log.info("training report: %s", training_report.write_training_report(run, cfg.storage))
    except Exception as exc:  # noqa: BLE001 - the run's numbers are in metrics.csv and eval/ either way
        log.warning("training.html not written to %s: %s", run, exc)
    if mlflow_run is not None:
        tracking.finish_run(mlflow_run, run, cfg.data.manifest_uri, cfg.storage, status)


def validate(cfg: PretrainConfig) -> int:
    """Fail at start-up, naming the key, for settings that would fail later inside the workers; returns the
    epoch length (samples, after repeats) so workers need not read the manifest for it."""
    t, p = cfg.train, cfg.model
    if t.use_gpu and not _gpus_visible():
        raise config_lib.ConfigError("train.use_gpu=true but this cluster has no GPUs; set train.use_gpu=false "
                                     "(CPU, gloo) or run on a GPU cluster")
    global_batch_size(p, t)  # worker range, and a global batch every worker count divides
    if t.cpus_per_worker <= 0:
        raise config_lib.ConfigError("train.cpus_per_worker must be > 0")
    if p.augment.global_crops.size % p.vit.patch_size or p.augment.local_crops.size % p.vit.patch_size:
        raise config_lib.ConfigError(
            f"crop sizes ({p.augment.global_crops.size}, {p.augment.local_crops.size}) must be multiples of "
            f"model.vit.patch_size={p.vit.patch_size}")
    if p.optim.clip_scope not in CLIP_SCOPES:
        raise config_lib.ConfigError(f"model.optim.clip_scope={p.optim.clip_scope!r}: must be one of {CLIP_SCOPES} "
                                     f"(submodule: each student part on its own norm, as DINOv2)")
    if t.checkpoint_every < 1:
        raise config_lib.ConfigError("train.checkpoint_every must be >= 1")
    validation.check(cfg.eval, cfg.storage)
    tracking.check(cfg.tracking)  # mlflow installed, the store reachable
    if t.final_export:
        check_formats(t.final_export)  # names the unknown format
        check_card_paths(cfg.export.card_paths)
    table = read_manifest(cfg.data.manifest_uri, cfg.storage)  # names the file / missing columns
    # the first images of every manifest open: a wrong location fails here, in one line, not in a Ray Data task
    manifest.check_images(table, cfg.data.manifest_uri, cfg.storage, purpose="training manifest (data.manifest_uri)")
    for uri in cfg.eval.manifests:
        manifest.check_images(manifest.read_manifest(uri, cfg.storage, ("uri",)), uri, cfg.storage,
                              purpose="labelled manifest (eval.manifests)")
    return len(expand_repeats(table))


def _gpus_visible() -> bool:
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.cuda.is_available()
