"""A backbone from a spec string, and its features on images.

A spec is one of ``handcrafted`` (the weights-free features), ``random:<arch>[:<patch>:<img_size>]`` (random
init, for the random-init baseline) or a checkpoint URI in any format ``models.checkpoints`` reads (DINOv2 hub,
DinoBloom release, cytoray export, cytoray training checkpoint directory).
"""

from __future__ import annotations

import numpy as np

from cytoray.features.preprocess import Preprocess

HANDCRAFTED = "handcrafted"
RANDOM_PREFIX = "random:"
RANDOM_INIT_SEED = 0  # random:<arch> is the same model every time


def build_backbone(spec: str, storage_cfg=None, arch: str | None = None):
    """(ViT in eval mode, the recorded preprocessing or None) for a ``random:`` spec or a checkpoint URI.

    ``random:vit_debug`` builds the debug preset's model (patch 8, 64 px, LayerScale 0.1). Random init draws from
    a private generator seeded with :data:`RANDOM_INIT_SEED`; the process's global RNG is left untouched.
    """
    import torch

    from cytoray.platform.models.checkpoints import load_model
    from cytoray.platform.models.vit import build_vit

    if spec == HANDCRAFTED:
        raise ValueError("'handcrafted' has no backbone; use features.extract for it")
    if spec.startswith(RANDOM_PREFIX):
        parts = spec.split(":")
        kw: dict = {"arch": parts[1]}
        if len(parts) > 2:
            kw["patch_size"] = int(parts[2])
        if len(parts) > 3:
            kw["img_size"] = int(parts[3])
        if parts[1] == "vit_debug":  # the debug preset's model (cytoray/configs/debug.yaml)
            kw.setdefault("patch_size", 8)
            kw.setdefault("img_size", 64)
            kw["layerscale"] = 0.1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = build_vit(**kw)
        return model.eval(), None
    model, meta = load_model(spec, storage_cfg, **({"arch": arch} if arch else {}))
    return model.eval(), meta.get("preprocess")


def backbone_preprocess(model, recorded: dict | None, size: int | None = None) -> Preprocess:
    """The preprocessing a backbone is scored with: its run's recorded normalisation and crop size; without a
    record (DINOv2 / DinoBloom files, random init) ImageNet statistics at min(img_size, 224), DinoBloom's probe
    size. ``size`` overrides the size either way."""
    if recorded is None and size is None:
        size = min(model.cfg.img_size, 224)
    return Preprocess.from_record(recorded, size)


def vit_features(model, images: list[np.ndarray], preprocess: Preprocess, device: str = "cpu",
                 cls_and_patch: bool = False) -> np.ndarray:
    """(N, D) float32 raw features of uint8 RGB images: the backbone's normalised CLS token (optionally ‖ the
    mean patch token)."""
    import torch

    with torch.no_grad():
        out = model.forward_features(preprocess(images).to(device))
    f = out["x_norm_clstoken"]
    if cls_and_patch:
        f = torch.cat([f, out["x_norm_patchtokens"].mean(1)], dim=1)
    return f.float().cpu().numpy()
