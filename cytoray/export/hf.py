"""Hugging Face transformers layout: ``config.json`` + ``model.safetensors`` that ``Dinov2Model`` (with registers:
``Dinov2WithRegistersModel``) loads, and ``preprocessor_config.json`` with the run's preprocessing.

Tensor names are those of the Hub's DINOv2 checkpoints (``facebook/dinov2-*``), which every transformers release
with DINOv2 reads (5.x renames them on load to its q_proj / o_proj / gate_proj ... modules):

    cls_token, mask_token, register_tokens   -> embeddings.{cls_token, mask_token, register_tokens}
    pos_embed                                -> embeddings.position_embeddings
    patch_embed.proj                         -> embeddings.patch_embeddings.projection
    blocks.N.norm1 / norm2                   -> encoder.layer.N.norm1 / norm2
    blocks.N.attn.qkv (3D x D)               -> encoder.layer.N.attention.attention.{query, key, value}
    blocks.N.attn.proj                       -> encoder.layer.N.attention.output.dense
    blocks.N.ls1.gamma / ls2.gamma           -> encoder.layer.N.layer_scale1.lambda1 / layer_scale2.lambda1
    blocks.N.mlp.fc1 / fc2                   -> encoder.layer.N.mlp.fc1 / fc2
    blocks.N.mlp.w12 / w3 (SwiGLU)           -> encoder.layer.N.mlp.weights_in / weights_out
    norm                                     -> layernorm

A model without LayerScale gets lambda = 1 (transformers always has the layer). The preprocessing is a
``BitImageProcessor`` (what transformers uses for DINOv2) set to cytoray's: bicubic resize to size x size, no crop,
/255, mean/std.
"""

from __future__ import annotations

import json

import torch

from cytoray import storage
from cytoray.export.spec import BackboneSpec, describe, safetensors_bytes
from cytoray.features.preprocess import Preprocess
from cytoray.platform.models.vit import VisionTransformer

WEIGHTS = "model.safetensors"


def hf_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The backbone's tensors under transformers' DINOv2 names (on the model's device; views where possible)."""
    sd = model.state_dict()
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.mask_token": sd["mask_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    ones = torch.ones_like(sd["norm.weight"])
    for i in range(model.n_blocks):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3)  # rows: all heads' q, then k, then v
            out.update({f"{dst}attention.attention.query.{kind}": q, f"{dst}attention.attention.key.{kind}": k,
                        f"{dst}attention.attention.value.{kind}": v,
                        f"{dst}attention.output.dense.{kind}": sd[f"{src}attn.proj.{kind}"],
                        f"{dst}norm1.{kind}": sd[f"{src}norm1.{kind}"], f"{dst}norm2.{kind}": sd[f"{src}norm2.{kind}"]})
            if f"{src}mlp.w12.{kind}" in sd:  # SwiGLU: w12 = [gate; up], as transformers' weights_in
                out[f"{dst}mlp.weights_in.{kind}"] = sd[f"{src}mlp.w12.{kind}"]
                out[f"{dst}mlp.weights_out.{kind}"] = sd[f"{src}mlp.w3.{kind}"]
            else:
                out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
        for n in (1, 2):
            out[f"{dst}layer_scale{n}.lambda1"] = sd.get(f"{src}ls{n}.gamma", ones)
    return out


def model_class(spec: BackboneSpec) -> str:
    return "Dinov2WithRegistersModel" if spec.num_register_tokens else "Dinov2Model"


def hf_config(spec: BackboneSpec) -> dict:
    """``config.json`` of a ``Dinov2Config`` / ``Dinov2WithRegistersConfig`` building the same ViT."""
    cfg = {"architectures": [model_class(spec)],
           "model_type": "dinov2_with_registers" if spec.num_register_tokens else "dinov2",
           "hidden_size": spec.embed_dim, "num_hidden_layers": spec.depth, "num_attention_heads": spec.num_heads,
           "mlp_ratio": 4, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "initializer_range": 0.02, "layer_norm_eps": 1e-6, "image_size": spec.img_size,
           "patch_size": spec.patch_size, "num_channels": 3, "qkv_bias": True,
           "layerscale_value": spec.layerscale or 1.0, "drop_path_rate": 0.0, "use_swiglu_ffn": spec.swiglu}
    if spec.num_register_tokens:
        cfg["num_register_tokens"] = spec.num_register_tokens
    else:
        cfg["use_mask_token"] = True
    return cfg


def preprocessor_config(pre: Preprocess) -> dict:
    """``preprocessor_config.json``: cytoray's :class:`Preprocess` as transformers' DINOv2 image processor."""
    return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True,
            "do_resize": True, "size": {"height": pre.size, "width": pre.size}, "resample": 3,  # PIL bicubic
            "do_center_crop": False, "crop_size": {"height": pre.size, "width": pre.size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(pre.mean), "image_std": list(pre.std)}


def write_hf(model: VisionTransformer, pre: Preprocess, out_uri: str,
             storage_cfg: storage.StorageConfig | None = None) -> None:
    spec = describe(model)
    storage.write_bytes(storage.join_uri(out_uri, WEIGHTS), safetensors_bytes(hf_state_dict(model)), storage_cfg)
    for name, content in (("config.json", hf_config(spec)), ("preprocessor_config.json", preprocessor_config(pre))):
        storage.write_bytes(storage.join_uri(out_uri, name), json.dumps(content, indent=2).encode(), storage_cfg)
