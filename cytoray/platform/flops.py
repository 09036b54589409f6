"""Model FLOPs of a DINOv2 training step, for the MFU on the training progress line (GPU runs).

Counted by ``torch.utils.flop_counter`` on meta-device copies of the backbone and DINO head (no memory, no
compute): per image, the student's forward + backward (3x forward) on every global and local crop, the
teacher's forward on the global crops, the DINO head on each crop's CLS token and the iBOT head on the expected
number of masked patch tokens. It agrees within 5% with a whole step counted on real tensors through the math
attention path (``tests/platform/test_objective.py``; the counter does not see the FLOPs of PyTorch's fused CPU
attention kernel, so a plain count on CPU misses attention).
"""

from __future__ import annotations

import torch

from cytoray.platform.models.heads import DINOHead
from cytoray.platform.models.vit import ViTConfig, build_vit

# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def forward_flops(vit: ViTConfig, size: int) -> float:
    """FLOPs of one image's backbone forward at ``size``."""
    return _count(lambda: build_vit(vit)(torch.empty(1, 3, size, size)))


def head_flops(vit: ViTConfig, objective) -> float:
    """FLOPs of the projection head on one token."""
    from cytoray.platform.models.vit import ARCHS

    return _count(lambda: DINOHead(ARCHS[vit.arch][0], objective.out_dim, objective.head_hidden_dim,
                                   objective.head_bottleneck_dim, objective.head_nlayers)(
        torch.empty(1, ARCHS[vit.arch][0])))


def train_flops_per_image(vit: ViTConfig, objective, augment, mask) -> float:
    """Training FLOPs per image of a step (see the module doc)."""
    g, loc = augment.global_crops, augment.local_crops
    head = head_flops(vit, objective)
    patches = (g.size // vit.patch_size) ** 2
    masked = g.number * mask.mask_probability * sum(mask.mask_ratio) / 2 * patches
    global_f = (forward_flops(vit, g.size) + head) * g.number
    local_f = (forward_flops(vit, loc.size) + head) * loc.number if loc.number else 0.0
    return 3.0 * (global_f + local_f + masked * head) + global_f + masked * head


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, if known (None on CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
