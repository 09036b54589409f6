"""Every random choice about a training sample, keyed by (run seed, global sample position).

A run is a function of its config, seed and global batch, not of the number of workers: a sample's crops,
flips, colour draws (``augment.MultiCrop``), iBOT mask and stochastic-depth drops come from a generator
seeded by the sample's position in the run's sample order (``stream.EpochOrder``), and the only per-batch
choice, DINOv2's mask plan (which crops of the batch are masked, at which ratios), is drawn once for the
whole global batch and each rank takes its slice. So 1, 2 or 64 workers train on the same views, a
checkpoint resumes on another world size, and an elastic run keeps its order.
"""

from __future__ import annotations

import numpy as np
import torch

from cytoray.platform.data.masking import MaskingGenerator
from cytoray.platform.loss.ibot import mask_weights

# Stream ids: independent generators for the different kinds of choice about one sample.
CROPS, MASK_PLAN, MASK, DROP = 0xC209, 0x3A5C, 0x3A5D, 0xD409


def sample_rng(seed: int, position: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(position), stream, *extra])


def crop_rngs(seed: int, positions: np.ndarray) -> list[np.random.Generator]:
    """One generator per sample for ``MultiCrop``."""
    return [sample_rng(seed, p, CROPS) for p in positions]


def mask_plan(num_crops: int, num_patches: int, mask_ratio: tuple[float, float], mask_probability: float,
              rng: np.random.Generator) -> np.ndarray:
    """(num_crops,) masked-patch targets for the global crops of one global batch, crop-major
    (crop ``g`` of batch sample ``b`` is entry ``g·B + b``): DINOv2's collate masks a share ``mask_probability``
    of the crops with ratios spread evenly over ``mask_ratio`` (stratified: one draw per linspace bin), leaves
    the rest unmasked, and shuffles."""
    n_masked = int(num_crops * mask_probability)
    bins = np.linspace(mask_ratio[0], mask_ratio[1], n_masked + 1)
    targets = np.zeros(num_crops, dtype=np.int64)
    targets[:n_masked] = [int(num_patches * rng.uniform(bins[i], bins[i + 1])) for i in range(n_masked)]
    return targets[rng.permutation(num_crops)]


def block_masks(seed: int, step: int, positions: np.ndarray, batch_index: np.ndarray, num_crops: int,
                global_batch: int, grid: tuple[int, int], mask_ratio: tuple[float, float], mask_probability: float,
                generator: MaskingGenerator) -> dict:
    """iBOT masks for this rank's global crops (crop-major, ``num_crops`` per sample).

    ``positions``: the samples' global positions; ``batch_index``: their indices within the global batch of
    ``global_batch`` samples at ``step``. The plan is keyed by (seed, step), each mask's shape by (seed,
    position, crop). Returns masks (G·B, N) bool, mask_indices (M,) into the flattened (G·B·N) patches,
    masks_weight (M,) = 1 / masked patches of the crop's image, n_masked_patches.
    """
    n = grid[0] * grid[1]
    plan = mask_plan(num_crops * global_batch, n, mask_ratio, mask_probability,
                     np.random.default_rng([seed, int(step), MASK_PLAN]))
    masks = np.zeros((num_crops, len(positions), n), dtype=bool)
    for g in range(num_crops):
        for j, (pos, b) in enumerate(zip(positions, batch_index)):
            target = int(plan[g * global_batch + int(b)])
            if target:
                masks[g, j] = generator(target, sample_rng(seed, pos, MASK, g)).reshape(n)
    return mask_fields(torch.from_numpy(masks.reshape(-1, n)))


def mask_fields(masks: torch.Tensor) -> dict:
    """(crops, N) bool masks -> the batch fields the iBOT loss reads: masks, mask_indices (M,) into the
    flattened patches, masks_weight (M,), n_masked_patches."""
    indices = masks.flatten().nonzero().flatten()
    return {"masks": masks, "mask_indices": indices, "masks_weight": mask_weights(masks),
            "n_masked_patches": int(indices.numel())}


def drop_noise(seed: int, positions: np.ndarray, num_global: int, num_local: int, depth: int) -> dict:
    """Stochastic-depth uniforms per crop, block and branch (attention, MLP): drop_noise_global (G·B, depth, 2)
    and drop_noise_local (L·B, depth, 2), crop-major like the crops."""
    u = np.stack([sample_rng(seed, p, DROP).random((num_global + num_local, depth, 2)) for p in positions])
    u = torch.from_numpy(u.astype(np.float32)).transpose(0, 1)  # (crops, B, depth, 2)
    return {"drop_noise_global": u[:num_global].flatten(0, 1), "drop_noise_local": u[num_global:].flatten(0, 1)}
