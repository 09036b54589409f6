"""Manifest -> multi-crop training batches, streamed through Ray Data, resumable at any sample.

Order is a pure function, so resume is exact: epoch ``e`` is the manifest expanded by ``repeats``
(curation's balancing) and permuted with a seed derived from (run seed, e). Sample positions run on across
epochs; rank ``r`` at training step ``s`` takes positions ``consumed(s) + r·B … + B-1`` where ``B`` is the
per-rank batch (the global batch divided by the workers), and each sample's crops come from a generator
keyed by its position (``keys.py``), so the views of a step do not depend on the number of workers.
Restoring a checkpoint restores ``samples_consumed``; the next batch is the one that would have come, with
the same crops, on any number of workers that divides the global batch.

Why each rank builds its own Ray Data pipeline (not ``TorchTrainer(datasets=...)``): Ray Train's
``streaming_split`` hands blocks to ranks dynamically and restarts from the first row after a worker-group
restart; open-source Ray has no iterator checkpoint, so an exact position could only be reached by decoding
and discarding everything before it. Here the rank's pipeline starts at its position and nothing is
decoded twice. Decode and multi-crop run in an actor pool (``map_batches``), optionally pinned to CPU-only
nodes by a label selector; each step reaches the pool as its own block (``step_source``), so every actor
works, and the output keeps step order; ``iter_torch_batches`` hands the tensors to the loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from cytoray import images, manifest, storage
from cytoray.config import location_field
from cytoray.manifest import ManifestError
from cytoray.platform.data import keys
from cytoray.platform.data.augment import AugmentConfig, MultiCrop
from cytoray.runtime import keep_image_buffers_on_heap

log = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    """Where training images come from and how much CPU decodes and crops them."""

    manifest_uri: str = location_field("???")  # curated manifest.parquet (file or directory; local or object storage)
    num_actors: int = 1  # decode + multi-crop actors per training worker
    num_cpus: float = 1.0  # CPUs per actor (fractional on small machines)
    prefetch_batches: int = 2  # batches decoded ahead of the training step
    # Steps queued per actor: with 2 an actor idled between steps while the in-order output waited on the
    # other actor; 4 took the stream from 0.98x to 1.03x a DataLoader's batches/s (benchmarks/RESULTS.md).
    steps_in_flight: int = 4
    label_selector: dict[str, str] = field(default_factory=dict)  # e.g. {cytoray-role: data}: CPU-only nodes
    max_pixels: int = 50_000_000  # decode guard (decompression bombs)


def read_manifest(uri: str, storage_cfg: storage.StorageConfig | None = None,
                  columns: tuple[str, ...] = ("image_id", "uri")) -> pa.Table:
    """The training manifest's ``columns`` plus ``repeats``/``weight`` when present."""
    return manifest.read_manifest(uri, storage_cfg, columns, optional=manifest.SAMPLING_COLUMNS,
                                  purpose="training manifest (data.manifest_uri)",
                                  fix="point data.manifest_uri at a curation run's manifest.parquet")


def expand_repeats(table: pa.Table) -> np.ndarray:
    """Row index of every sample in one epoch: row i appears ``repeats[i]`` times.

    Without ``repeats``, a ``weight`` column (relative sampling weight) is turned into integer repeats that
    keep the epoch at the manifest's size (largest-remainder rounding, deterministic). Neither: each row once.
    """
    n = table.num_rows
    if "repeats" in table.column_names:
        reps = np.asarray(table.column("repeats").fill_null(1).to_numpy(zero_copy_only=False), dtype=np.int64)
        if (reps < 0).any():
            raise ManifestError(f"manifest column 'repeats' has negative values (row {int(np.argmin(reps))}); "
                                "repeats counts how often a row is seen per epoch and must be >= 0")
    elif "weight" in table.column_names:
        w = np.asarray(table.column("weight").fill_null(0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ManifestError("manifest column 'weight' must be finite, >= 0 and not all zero")
        exact = w / w.sum() * n
        reps = np.floor(exact).astype(np.int64)
        short = n - int(reps.sum())
        if short:
            reps[np.argsort(-(exact - reps), kind="stable")[:short]] += 1
    else:
        reps = np.ones(n, dtype=np.int64)
    index = np.repeat(np.arange(n, dtype=np.int64), reps)
    if index.size == 0:
        raise ManifestError("every manifest row has repeats=0; an epoch would be empty")
    return index


def epoch_permutation(epoch_len: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(epoch_len)


def batch_positions(samples_consumed: int, batch_size: int, rank: int) -> np.ndarray:
    """Global sample positions of rank ``rank``'s batch once ``samples_consumed`` samples were used."""
    start = samples_consumed + rank * batch_size
    return np.arange(start, start + batch_size, dtype=np.int64)


class EpochOrder:
    """Position -> manifest row, epoch by epoch; caches the current epoch's permutation."""

    def __init__(self, index: np.ndarray, seed: int):
        self.index, self.seed, self._cached = index, seed, (-1, None)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty(len(positions), dtype=np.int64)
        epochs = positions // len(self.index)
        for e in np.unique(epochs):
            if self._cached[0] != e:
                self._cached = (int(e), epoch_permutation(len(self.index), self.seed, int(e)))
            sel = epochs == e
            out[sel] = self.index[self._cached[1][positions[sel] % len(self.index)]]
        return out


class MultiCropBatches:
    """Ray Data actor: one input row (a training step) -> that step's decoded, multi-cropped batch.

    Output arrays carry a leading axis of 1 (one step per row): global_crops (1, G, B, 3, S, S),
    local_crops (1, L, B, 3, s, s), plus for audit the positions used (1, B) and the process that built the
    step (``worker``: its pid, (1,)).
    """

    def __init__(self, manifest_uri: str, storage_cfg: storage.StorageConfig | None, augment: AugmentConfig,
                 seed: int, batch_size: int, world_size: int, rank: int, start_step: int, start_samples: int,
                 max_pixels: int = 50_000_000):
        keep_image_buffers_on_heap()
        table = read_manifest(manifest_uri, storage_cfg)
        self.uris = table.column("uri").to_pylist()
        self.order = EpochOrder(expand_repeats(table), seed)
        self.multicrop = MultiCrop(augment)
        self.storage_cfg, self.seed, self.max_pixels = storage_cfg, seed, max_pixels
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.start_step, self.start_samples = start_step, start_samples

    def positions(self, step: int) -> np.ndarray:
        consumed = self.start_samples + (step - self.start_step) * self.batch_size * self.world_size
        return batch_positions(consumed, self.batch_size, self.rank)

    def _load(self, row: int) -> np.ndarray:
        uri = self.uris[row]
        try:
            return images.decode(storage.read_bytes(uri, self.storage_cfg), min_side=1,
                                 max_pixels=self.max_pixels, settings="data").rgb
        except images.ImageRejected as exc:
            raise ManifestError(f"training image {uri!r} (manifest row {row}) cannot be decoded: {exc}. "
                                "Re-run curation so it is quarantined, or remove the row") from exc

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"global_crops": [], "local_crops": [], "positions": [], "step": [], "worker": []}
        for step in batch["step"]:
            pos = self.positions(int(step))
            imgs = [self._load(int(r)) for r in self.order.rows(pos)]
            crops = self.multicrop(imgs, keys.crop_rngs(self.seed, pos))
            out["global_crops"].append(crops["global_crops"].numpy())
            out["local_crops"].append(crops["local_crops"].numpy())
            out["positions"].append(pos)
            out["step"].append(int(step))
            out["worker"].append(os.getpid())
        # The stream sends one step per call: add the leading axis as a view rather than copy ~34 MB (DinoBloom crops).
        return {k: np.asarray(v[0])[None] if len(v) == 1 else np.stack(v) for k, v in out.items()}


def build_stream(cfg: StreamConfig, storage_cfg: storage.StorageConfig | None, augment: AugmentConfig, seed: int,
                 batch_size: int, world_size: int, rank: int, start_step: int, end_step: int, start_samples: int):
    """The Ray Dataset of this rank's steps ``[start_step, end_step)``, in order."""
    import ray

    from cytoray.platform.data.step_source import StepSource

    # One block per step, read lazily by zero-CPU tasks: the actor pool hands out whole blocks, so a single
    # block of all steps would keep one actor busy and the others idle (issue 14).
    ds = ray.data.read_datasource(StepSource(start_step, end_step), num_cpus=0, concurrency=1)
    # The dataset's own copy of the context (taken at construction, used to execute it): the process-wide
    # DataContext stays untouched.
    ctx = ds.context
    ctx.execution_options.preserve_order = True  # step k's batch is the k-th row out
    ctx.target_max_block_size = 1  # one row per block: the read op does not merge steps, nor the actors' output
    ctx.op_resource_reservation_enabled = False  # small clusters: reservations serialise the actors
    ctx.enable_progress_bars = False
    return ds.map_batches(
        MultiCropBatches, batch_size=1, batch_format="numpy", num_cpus=cfg.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=cfg.steps_in_flight),
        fn_constructor_kwargs=dict(manifest_uri=cfg.manifest_uri, storage_cfg=storage_cfg, augment=augment,
                                   seed=seed, batch_size=batch_size, world_size=world_size, rank=rank,
                                   start_step=start_step, start_samples=start_samples, max_pixels=cfg.max_pixels),
        label_selector=dict(cfg.label_selector) or None)


def iter_steps(ds, prefetch_batches: int = 2):
    """Yield ``(step, {"global_crops", "local_crops", "positions"})`` as torch tensors, one step at a time."""
    for batch in ds.iter_torch_batches(batch_size=1, prefetch_batches=prefetch_batches):
        del batch["worker"]
        yield int(batch.pop("step")[0]), {k: v[0] for k, v in batch.items()}
