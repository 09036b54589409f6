"""iBOT block masking (BEiT-style): one mask of a target size on a patch grid (the plan over a batch: ``keys.py``)."""

from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    """Random rectangular blocks on a (h, w) patch grid until ``num_masking_patches`` are masked.

    Each block has between ``min_num_patches`` and ``max_num_patches`` patches (fewer when it fills the last
    remainder) and an aspect ratio in [min_aspect, 1/min_aspect] (log-uniform), as in BEiT / DINOv2.
    """

    def __init__(self, input_size: tuple[int, int], min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or self.num_patches // 2
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def _block(self, mask: np.ndarray, max_patches: int, rng: np.random.Generator) -> int:
        """Mask one block of at most ``max_patches`` new patches; returns how many it masked (0 after 10 misses).

        The area is drawn between ``min_num_patches`` and the remaining budget also when the budget is the
        smaller bound, as DINOv2's ``random.uniform(min, budget)`` (``a + (b - a) * random()``; numpy's
        ``uniform`` refuses b < a), so the last blocks can fill a remainder below ``min_num_patches``.
        """
        delta = 0
        for _ in range(10):
            target = self.min_num_patches + (max_patches - self.min_num_patches) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w < self.width and 0 < h < self.height:
                top, left = int(rng.integers(0, self.height - h + 1)), int(rng.integers(0, self.width - w + 1))
                region = mask[top : top + h, left : left + w]
                new = h * w - int(region.sum())
                if 0 < new <= max_patches:
                    region[:] = True
                    delta = new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            delta = self._block(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if delta == 0:
                break
            count += delta
        return mask
