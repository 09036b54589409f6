"""Decoded images -> one DINOv2 training batch: multi-crop views plus iBOT masks for the global crops.

The two halves run in different places when streaming: multi-crop in Ray Data's CPU actors
(``stream.py``), masks in the training loop (:class:`MaskCollator`, cheap and model-dependent: the patch
grid). :class:`BatchBuilder` puts them together for single-process use and tests.
"""

from __future__ import annotations

import numpy as np
import torch

from cytoray.platform.data.augment import MultiCrop
from cytoray.platform.data.masking import MaskingGenerator, collate_masks


class MaskCollator:
    """iBOT block masks for ``n`` global crops of ``size`` px with ``patch_size`` patches."""

    def __init__(self, size: int, patch_size: int, mask_ratio=(0.1, 0.5), mask_probability: float = 0.5,
                 min_num_patches: int = 4, min_aspect: float = 0.3):
        if size % patch_size:
            raise ValueError(f"global crop size {size} is not a multiple of the patch size {patch_size}")
        self.grid = (size // patch_size, size // patch_size)
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), mask_probability
        self.masker = MaskingGenerator(self.grid, min_num_patches, None, min_aspect)

    def __call__(self, num_global_crops: int, rng: np.random.Generator) -> dict:
        return collate_masks(num_global_crops, self.grid, self.mask_ratio, self.mask_probability, self.masker, rng)


class BatchBuilder:
    def __init__(self, multicrop: MultiCrop, patch_size: int, mask_ratio=(0.1, 0.5), mask_probability: float = 0.5,
                 min_num_patches: int = 4, min_aspect: float = 0.3):
        self.multicrop = multicrop
        self.masks = MaskCollator(multicrop.cfg.global_crops.size, patch_size, mask_ratio, mask_probability,
                                  min_num_patches, min_aspect)
        self.grid = self.masks.grid

    def __call__(self, images: list[np.ndarray], rng: np.random.Generator, generator: torch.Generator) -> dict:
        batch = self.multicrop(images, rng, generator)
        batch.update(self.masks(batch["global_crops"].shape[0] * len(images), rng))
        return batch
