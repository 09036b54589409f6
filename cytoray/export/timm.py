"""timm layout: ``model.safetensors`` in timm's ``VisionTransformer`` names and a hub-style ``config.json``
(``architecture``, ``num_classes``, ``model_args``, ``pretrained_cfg``), so that
``timm.create_model("local-dir:<dir>", pretrained=True)`` or ``"hf-hub:<repo>"`` builds and loads the backbone.

The architecture is one of timm's DINOv2 entry points (``vit_{small,base,large,giant}_patch14_dinov2`` and their
``_reg4_`` variants, timm/models/vision_transformer.py); ``model_args`` carry what differs from it (``img_size``
always: the stored pos_embed grid; width, depth, heads, patch for cytoray's other archs, e.g. vit_debug).
Tensors differ from DINOv2's names only where timm's converter (``_convert_dinov2``) changes them:

- no ``mask_token`` (timm has none); without LayerScale, ``ls1.gamma`` = ``ls2.gamma`` = 1;
- SwiGLU ``mlp.w12`` / ``mlp.w3`` -> ``mlp.fc1`` / ``mlp.fc2`` (timm's ``SwiGLUPacked``: fc1 = [gate; up]);
- with registers (timm ``no_embed_class=True``): ``reg_token`` = register_tokens, ``cls_token`` = cls_token +
  pos_embed[:, 0], ``pos_embed`` = pos_embed[:, 1:] (1, N, D) — the same sums, as the CLS position is never resized.
"""

from __future__ import annotations

import json

import torch

from cytoray import storage
from cytoray.export.spec import BackboneSpec, describe, safetensors_bytes
from cytoray.features.preprocess import Preprocess
from cytoray.platform.models.vit import VisionTransformer

WEIGHTS = "model.safetensors"

# timm's DINOv2 entry points and the model arguments each fixes (giant: SwiGLUPacked FFN of hidden 2 x 4096).
TIMM_ARCHS = {
    "vit_small_patch14_dinov2": dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5),
    "vit_base_patch14_dinov2": dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5),
    "vit_large_patch14_dinov2": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5),
    "vit_giant_patch14_dinov2": dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                                     mlp_ratio=2.66667 * 2),
}
TIMM_ARCHS.update({name.replace("_patch14_", "_patch14_reg4_"): dict(args, reg_tokens=4, no_embed_class=True)
                   for name, args in list(TIMM_ARCHS.items())})
SIZES = {"vit_small": "small", "vit_base": "base", "vit_large": "large", "vit_giant2": "giant"}


def timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The backbone's tensors under timm's names and layouts (on the model's device)."""
    sd = {k: v for k, v in model.state_dict().items() if k != "mask_token"}
    ones = torch.ones_like(sd["norm.weight"])
    sd.update({f"blocks.{i}.ls{n}.gamma": ones for i in range(model.n_blocks) for n in (1, 2)
               if f"blocks.{i}.ls{n}.gamma" not in sd})  # timm's DINOv2 models always have LayerScale
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    return {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in sd.items()}


def timm_architecture(spec: BackboneSpec, input_size: int | None = None) -> tuple[str, dict]:
    """(timm entry point, model_args): the named DINOv2 model closest to ``spec`` and what differs from it.
    ``input_size`` other than the stored grid's adds ``dynamic_img_size`` (pos_embed resized per input)."""
    size = "giant" if spec.swiglu else SIZES.get(spec.arch, "small")
    name = f"vit_{size}_patch14_{'reg4_' if spec.num_register_tokens else ''}dinov2"
    base = TIMM_ARCHS[name]
    # init_values only sets LayerScale's init (the weights overwrite it); without LayerScale gamma = 1 is exported,
    # as timm drops None model args
    needed = dict(patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                  init_values=spec.layerscale or base["init_values"])
    if spec.num_register_tokens:
        needed["reg_tokens"] = spec.num_register_tokens
    if spec.swiglu and int(spec.embed_dim * base["mlp_ratio"]) != 2 * spec.ffn_hidden:
        needed["mlp_ratio"] = (2 * spec.ffn_hidden + 0.5) / spec.embed_dim  # timm: int(dim * ratio) = 2 x hidden
    args = {k: v for k, v in needed.items() if base.get(k) != v}
    args["img_size"] = spec.img_size
    if input_size is not None and input_size != spec.img_size:
        args["dynamic_img_size"] = True
    return name, args


def timm_config(spec: BackboneSpec, pre: Preprocess) -> dict:
    """timm's hub ``config.json``: the data config is cytoray's preprocessing (bicubic, no crop)."""
    name, args = timm_architecture(spec, pre.size)
    return {"architecture": name, "num_classes": 0, "num_features": spec.embed_dim, "global_pool": "token",
            "model_args": args,
            "pretrained_cfg": {"tag": "cytoray", "custom_load": False, "input_size": [3, pre.size, pre.size],
                               "fixed_input_size": pre.size == spec.img_size, "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "center", "mean": list(pre.mean), "std": list(pre.std),
                               "num_classes": 0, "pool_size": None, "first_conv": "patch_embed.proj",
                               "classifier": "head"}}


def write_timm(model: VisionTransformer, pre: Preprocess, out_uri: str,
               storage_cfg: storage.StorageConfig | None = None) -> None:
    storage.write_bytes(storage.join_uri(out_uri, WEIGHTS), safetensors_bytes(timm_state_dict(model)), storage_cfg)
    storage.write_bytes(storage.join_uri(out_uri, "config.json"),
                        json.dumps(timm_config(describe(model), pre), indent=2).encode(), storage_cfg)
