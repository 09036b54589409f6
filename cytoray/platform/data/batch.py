"""Decoded images -> one DINOv2 training batch: multi-crop views plus iBOT masks for the global crops."""

from __future__ import annotations

import numpy as np
import torch

from cytoray.platform.data.augment import MultiCrop
from cytoray.platform.data.masking import MaskingGenerator, collate_masks


class BatchBuilder:
    def __init__(self, multicrop: MultiCrop, patch_size: int, mask_ratio=(0.1, 0.5), mask_probability: float = 0.5,
                 min_num_patches: int = 4, min_aspect: float = 0.3):
        size = multicrop.cfg.global_crops.size
        if size % patch_size:
            raise ValueError(f"global crop size {size} is not a multiple of the patch size {patch_size}")
        self.multicrop, self.grid = multicrop, (size // patch_size, size // patch_size)
        self.mask_ratio, self.mask_probability = tuple(mask_ratio), mask_probability
        self.masker = MaskingGenerator(self.grid, min_num_patches, None, min_aspect)

    def __call__(self, images: list[np.ndarray], rng: np.random.Generator, generator: torch.Generator) -> dict:
        batch = self.multicrop(images, rng, generator)
        n_global = batch["global_crops"].shape[0] * len(images)
        batch.update(collate_masks(n_global, self.grid, self.mask_ratio, self.mask_probability, self.masker, rng))
        return batch
