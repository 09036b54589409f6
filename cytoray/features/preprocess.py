"""Image -> tensor the way a backbone was trained to see it: resize, scale to [0, 1], normalise.

A cytoray training run records its normalisation and global-crop size in every checkpoint (``train_state.json``
and the exported file's ``cytoray`` entry, key ``preprocess``); evaluation and embedding read it back, so the probe
sees images exactly as the run's config prepared them. Checkpoints that record nothing (DINOv2 hub, DinoBloom
releases) were trained with ImageNet statistics, the default here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Bicubic resize to ``size``×``size``, /255, then (x - mean) / std per channel."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_record(cls, record: dict | None, size: int | None = None) -> Preprocess:
        """From a checkpoint's ``preprocess`` entry (None: ImageNet statistics); ``size`` overrides its size."""
        record = dict(record or {})
        if size is not None:
            record["size"] = int(size)
        unknown = set(record) - {"size", "mean", "std"}
        if unknown:
            raise ValueError(f"preprocess record has unknown keys {sorted(unknown)}; expected size, mean, std")
        return cls(**{k: tuple(float(x) for x in v) if k != "size" else int(v) for k, v in record.items()})

    def record(self) -> dict:
        """What a checkpoint stores (plain JSON)."""
        d = asdict(self)
        return {"size": d["size"], "mean": list(d["mean"]), "std": list(d["std"])}

    def __call__(self, images: list[np.ndarray]):
        """list of uint8 H×W×3 -> float32 tensor (N, 3, size, size)."""
        import torch

        x = np.stack([np.asarray(Image.fromarray(im).resize((self.size, self.size), Image.BICUBIC))
                      for im in images])
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (t - mean) / std
