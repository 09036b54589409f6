"""Decoded images -> one DINOv2 training batch: multi-crop views plus iBOT masks and stochastic-depth draws.

The halves run in different places when streaming: multi-crop in Ray Data's CPU actors (``stream.py``),
masks and drop noise in the training loop (:class:`SampleDraws`: cheap and model-dependent: the patch grid,
the depth). :class:`BatchBuilder` puts them together for single-process use and tests. All draws are keyed
per sample (``keys.py``).
"""

from __future__ import annotations

import numpy as np

from cytoray.platform.data import keys
from cytoray.platform.data.augment import MultiCrop
from cytoray.platform.data.masking import MaskingGenerator


class SampleDraws:
    """iBOT block masks for the global crops (``size`` px, ``patch_size`` patches) and, with ``depth`` > 0 and
    ``drop_path_rate`` > 0, the student's stochastic-depth uniforms."""

    def __init__(self, size: int, patch_size: int, mask_ratio=(0.1, 0.5), mask_probability: float = 0.5,
                 min_num_patches: int = 4, min_aspect: float = 0.3, depth: int = 0, drop_path_rate: float = 0.0):
        if size % patch_size:
            raise ValueError(f"global crop size {size} is not a multiple of the patch size {patch_size}")
        self.grid = (size // patch_size, size // patch_size)
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), mask_probability
        self.masker = MaskingGenerator(self.grid, min_num_patches, None, min_aspect)
        self.depth = depth if drop_path_rate > 0 else 0

    def __call__(self, seed: int, step: int, positions: np.ndarray, batch_index: np.ndarray, global_batch: int,
                 num_global: int, num_local: int) -> dict:
        """Draws for this rank's samples at ``positions`` (indices ``batch_index`` in the global batch)."""
        out = keys.block_masks(seed, step, positions, batch_index, num_global, global_batch, self.grid,
                               self.mask_ratio, self.mask_probability, self.masker)
        if self.depth:
            out.update(keys.drop_noise(seed, positions, num_global, num_local, self.depth))
        return out


class BatchBuilder:
    """Images at global sample ``positions`` -> a full training batch, as the stream and loop together make it."""

    def __init__(self, multicrop: MultiCrop, patch_size: int, mask_ratio=(0.1, 0.5), mask_probability: float = 0.5,
                 min_num_patches: int = 4, min_aspect: float = 0.3, depth: int = 0, drop_path_rate: float = 0.0):
        self.multicrop = multicrop
        self.draws = SampleDraws(multicrop.cfg.global_crops.size, patch_size, mask_ratio, mask_probability,
                                 min_num_patches, min_aspect, depth, drop_path_rate)
        self.grid = self.draws.grid

    def __call__(self, images: list[np.ndarray], seed: int, step: int = 0, positions: np.ndarray | None = None,
                 global_batch: int | None = None) -> dict:
        """``positions`` default to ``step·B … step·B + B-1`` (one process, batch of B = len(images))."""
        b = len(images)
        positions = np.arange(step * b, (step + 1) * b) if positions is None else np.asarray(positions)
        global_batch = global_batch or b
        batch = self.multicrop(images, keys.crop_rngs(seed, positions))
        batch.update(self.draws(seed, step, positions, positions % global_batch, global_batch,
                                self.multicrop.cfg.global_crops.number, self.multicrop.cfg.local_crops.number))
        return batch
