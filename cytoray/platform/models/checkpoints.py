"""Backbone checkpoints in the three formats users meet, loaded as data (``weights_only=True``).

- ``dinov2``: a DINOv2 hub file (``dinov2_vitl14_pretrain.pth``): a flat backbone state dict, pos_embed for
  518 px (1×1370×D for /14). :func:`load_pretrained_weights` (training initialisation) resizes its pos_embed once to the
  model's grid, as DinoBloom did (trained at 224: 16×16); :func:`build_from_checkpoint` (evaluation) keeps the
  37×37 grid and interpolates at run time with the hub model's settings, so features match the official model.
- ``dinobloom``: a DinoBloom release (``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``,
  pos_embed 1×257×D); heads are dropped. Also reads DINOv2 *training* checkpoints
  (``{"model": {"teacher.backbone.*", ...}}``) and chunked block names (``blocks.<chunk>.<i>.``).
- ``cytoray``: what :func:`export_dinobloom` writes — the DinoBloom layout plus a ``cytoray`` metadata entry
  (arch and options), so DinoBloom users load it unchanged and cytoray rebuilds the architecture from it.

A cytoray *training* checkpoint directory (``<run>/checkpoint_<step>``: sharded ``torch.distributed.checkpoint``
files + ``train_state.json``) also loads with :func:`build_from_checkpoint`: only the teacher backbone's tensors
are read (ranged reads, no optimizer state, no process group), the architecture comes from ``train_state.json``.

A file of the wrong architecture or size fails with the mismatched keys named.
"""

from __future__ import annotations

import io
import math
import re

import torch

from cytoray import storage
from cytoray.errors import UserError
from cytoray.platform.models.vit import ARCHS, VisionTransformer, ViTConfig, build_vit, resize_pos_embed

HEAD_PREFIXES = ("dino_head.", "ibot_head.", "head.")
EXPECTED = ("a dict state dict: a DINOv2 hub backbone ({'pos_embed': ..., 'blocks.0...': ...}), a DINOv2 training "
            "checkpoint ({'model': {'teacher.backbone.*': ...}}), a DinoBloom release "
            "({'teacher': {'backbone.*': ...}}) or a cytoray export")


class CheckpointError(UserError):
    pass


def read_checkpoint(uri: str, storage_cfg: storage.StorageConfig | None = None) -> dict:
    """torch.load with weights_only=True from a local path or any storage URI; anything but a dict fails here,
    naming the file, rather than deep inside the loading."""
    data = storage.read_bytes(uri, storage_cfg)
    if not data:
        raise CheckpointError(f"{uri} is empty (0 bytes); expected {EXPECTED}")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{uri} is not a loadable weights-only torch checkpoint "
                              f"({type(exc).__name__}: {exc}); expected {EXPECTED}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{uri} holds a {type(ckpt).__name__}, not a dict; expected {EXPECTED}")
    return ckpt


def detect_format(ckpt: dict, source: str = "checkpoint") -> str:
    """dinobloom | cytoray | dinov2_train | dinov2; ``source`` (the file) names it in the error."""
    if "teacher" in ckpt and isinstance(ckpt["teacher"], dict):
        return "cytoray" if "cytoray" in ckpt else "dinobloom"
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        return "dinov2_train"
    if "pos_embed" in ckpt or "cls_token" in ckpt:
        return "dinov2"
    raise CheckpointError(f"{source} has an unrecognised layout (top-level keys: {sorted(map(str, ckpt))[:10]}); "
                          f"expected {EXPECTED}")


def backbone_state_dict(ckpt: dict, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone's tensors with DINOv2 names, from any supported layout."""
    fmt = detect_format(ckpt, source)
    if fmt in ("dinobloom", "cytoray"):
        src, prefix = ckpt["teacher"], "backbone."
    elif fmt == "dinov2_train":
        src, prefix = ckpt["model"], "teacher.backbone."
    else:
        src, prefix = ckpt, ""
    out = {}
    for k, v in src.items():
        if prefix and not k.startswith(prefix):
            continue  # heads and the student
        k = k[len(prefix):]
        if k.startswith(HEAD_PREFIXES):
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)] = v  # un-chunk blocks.<chunk>.<i>.
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source} ({fmt} layout) has non-tensor backbone entries {not_tensors[:5]}"
                              f"{f' (+{len(not_tensors) - 5})' if len(not_tensors) > 5 else ''}; expected {EXPECTED}")
    return out


def source_vit_settings(sd: dict[str, torch.Tensor]) -> dict:
    """ViTConfig fields fixed by a DINOv2-named backbone state dict: patch size, ``img_size`` whose grid is the
    stored pos_embed's, registers, the arch its width and depth name, and the run-time pos_embed interpolation
    of DINOv2's hub and eval configs (offset 0.1; with registers antialiased and offset 0)."""
    out: dict = {}
    if "patch_embed.proj.weight" in sd:
        out["patch_size"] = sd["patch_embed.proj.weight"].shape[-1]
        if "pos_embed" in sd:
            out["img_size"] = math.isqrt(sd["pos_embed"].shape[1] - 1) * out["patch_size"]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    out.update(num_register_tokens=registers, interpolate_antialias=registers > 0,
               interpolate_offset=0.0 if registers else 0.1)
    if "cls_token" in sd:
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        arch = [a for a, (dim, d, _, _) in ARCHS.items() if (dim, d) == (sd["cls_token"].shape[-1], depth)]
        if len(arch) == 1:
            out["arch"] = arch[0]
    return out


def load_pretrained_weights(model: VisionTransformer, ckpt_or_uri, storage_cfg: storage.StorageConfig | None = None) -> str:
    """Load weights into ``model``, resizing the pos_embed once to its grid (training initialisation, as
    DinoBloom from DINOv2); returns the detected format. Evaluation uses :func:`build_from_checkpoint`."""
    source = ckpt_or_uri if isinstance(ckpt_or_uri, str) else "checkpoint"
    ckpt = read_checkpoint(ckpt_or_uri, storage_cfg) if isinstance(ckpt_or_uri, str) else ckpt_or_uri
    fmt = detect_format(ckpt, source)
    load_state(model, backbone_state_dict(ckpt, source), f"{source} ({fmt})")
    return fmt


def load_state(model: VisionTransformer, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of a backbone state dict, pos_embed resized to the model's grid, mismatches named."""
    own = model.state_dict()
    if "pos_embed" in sd and "pos_embed" in own and sd["pos_embed"].shape != own["pos_embed"].shape \
            and sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        grid = int((own["pos_embed"].shape[1] - 1) ** 0.5)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (grid, grid), interpolate_offset=0.0)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        details = []
        if mismatched:
            details.append("shape mismatch: " + show([f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                                      for k in mismatched]))
        if missing:
            details.append(f"missing from checkpoint: {show(missing)}")
        if unexpected:
            details.append(f"not in model: {show(unexpected)}")
        raise CheckpointError(
            f"{source} does not fit {model.cfg.arch} (patch {model.patch_size}, "
            f"{model.num_register_tokens} registers): " + "; ".join(details)
            + ". Check model.arch / num_register_tokens / patch_size against the checkpoint.")
    model.load_state_dict(sd, strict=True)


def export_dinobloom(model: VisionTransformer, uri: str | None = None,
                     storage_cfg: storage.StorageConfig | None = None, extra: dict | None = None) -> dict:
    """The teacher backbone as a DinoBloom-style file: {"teacher": {"backbone.<k>": tensor}, "cytoray": meta}."""
    return export_state_dict(model.state_dict(), model.cfg, uri, storage_cfg, extra)


def export_state_dict(state: dict[str, torch.Tensor], vit: ViTConfig, uri: str | None = None,
                      storage_cfg: storage.StorageConfig | None = None, extra: dict | None = None) -> dict:
    """:func:`export_dinobloom` from a full backbone state dict (e.g. gathered from FSDP shards)."""
    from dataclasses import asdict

    ckpt = {"teacher": {f"backbone.{k}": v.detach().cpu().clone() for k, v in state.items()},
            "cytoray": {"format_version": 1, "vit": asdict(vit), **(extra or {})}}
    if uri is not None:
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        storage.write_bytes(uri, buf.getvalue(), storage_cfg)
    return ckpt


TRAIN_STATE = "train_state.json"


def is_training_checkpoint(uri: str, storage_cfg: storage.StorageConfig | None = None) -> bool:
    """A Ray Train checkpoint directory written by cytoray's pretraining (train_state.json + DCP shards)."""
    return storage.exists(storage.join_uri(uri, TRAIN_STATE), storage_cfg)


def load_training_checkpoint(uri: str, storage_cfg: storage.StorageConfig | None = None,
                             **vit_overrides) -> tuple[VisionTransformer, dict]:
    """(The EMA teacher backbone of a sharded training checkpoint, on CPU, in a single process; its
    ``train_state.json``)."""
    import json

    import torch.distributed.checkpoint as dcp

    state = json.loads(storage.read_bytes(storage.join_uri(uri, TRAIN_STATE), storage_cfg))
    if "vit" not in state and not vit_overrides:
        raise CheckpointError(f"{uri}/{TRAIN_STATE} does not name the architecture (checkpoint written before "
                              "cytoray recorded it); pass the model settings, e.g. arch=vit_small patch_size=14")
    model = build_vit(ViTConfig(**{**state.get("vit", {}), **vit_overrides}))
    want = {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}
    protocol, path = storage.split_protocol(uri)
    if protocol == "file":
        reader = dcp.FileSystemReader(path)
    else:  # ranged reads from object storage with the configured endpoint and credentials
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        fs, _ = storage.filesystem(uri, storage_cfg)
        reader = FsspecReader(uri, **fs.storage_options)
    have = set(reader.read_metadata().state_dict_metadata)
    missing = sorted(k for k in want if f"model.{k}" not in have)
    if missing:
        raise CheckpointError(f"{uri} has no teacher tensors {missing[:5]} (+{max(0, len(missing) - 5)}); "
                              "is it a cytoray pretraining checkpoint of this architecture?")
    import warnings

    with warnings.catch_warnings():  # "torch.distributed ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        sd = {"model": want}
        dcp.load(sd, storage_reader=reader)
    model.load_state_dict({k[len("teacher.backbone."):]: v for k, v in sd["model"].items()}, strict=True)
    return model, state


def load_model(uri: str, storage_cfg: storage.StorageConfig | None = None,
               **vit_overrides) -> tuple[VisionTransformer, dict]:
    """(The backbone as its source runs it, the checkpoint's cytoray metadata) for evaluation and embedding.

    Reads a cytoray export (architecture in its metadata), a cytoray training checkpoint directory
    (``train_state.json``), or a DINOv2 / DinoBloom file, whose patch size, pos_embed grid, registers and arch
    come from its tensors (:func:`source_vit_settings`); overrides win. The metadata is the export's ``cytoray``
    entry or the training state (both carry ``preprocess`` when the run recorded it); ``{}`` for other files.

    The pos_embed keeps the checkpoint's grid and is interpolated at run time with the source model's settings,
    so a DINOv2 hub file gives the official model's features at any input size (resizing 37→16 at load time
    with another offset, as :func:`load_pretrained_weights` does for training, gives different ones).
    """
    if is_training_checkpoint(uri, storage_cfg):
        return load_training_checkpoint(uri, storage_cfg, **vit_overrides)
    ckpt = read_checkpoint(uri, storage_cfg)
    fmt = detect_format(ckpt, uri)
    sd = backbone_state_dict(ckpt, uri)
    meta = ckpt["cytoray"] if isinstance(ckpt.get("cytoray"), dict) else {}
    model = build_vit(ViTConfig(**{**(meta.get("vit") or source_vit_settings(sd)), **vit_overrides}))
    load_state(model, sd, f"{uri} ({fmt})")
    return model, meta


def build_from_checkpoint(uri: str, storage_cfg: storage.StorageConfig | None = None,
                          **vit_overrides) -> VisionTransformer:
    """The backbone of :func:`load_model` without its metadata."""
    return load_model(uri, storage_cfg, **vit_overrides)[0]
