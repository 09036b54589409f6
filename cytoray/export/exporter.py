"""Export a backbone where users load models: one folder per format, each with its model card.

    <out>/hf/         config.json, model.safetensors, preprocessor_config.json, README.md   (transformers)
    <out>/timm/       config.json, model.safetensors, README.md                            (timm)
    <out>/dinobloom/  model.pth (DinoBloom layout + cytoray metadata), README.md           (cytoray, DINOv2 hub)
    <out>/provenance.json   full paths of the checkpoint, run, manifest and curation (local; not published)

Each folder uploads to a model hub as it is: its card names paths as ``export.card_paths`` says (default: relative
to the run), never the local paths of the machine that trained; those stay in ``provenance.json``.

:func:`export_model` exports any checkpoint ``load_model`` reads; :func:`export_run` exports a run's final
checkpoint into ``<run>/exports/final/`` (what pretraining calls when it ends); :func:`main` is
``recipes/export.py``. No Ray: everything runs in the calling process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from cytoray import config, console, storage
from cytoray.errors import UserError
from cytoray.export.card import model_card
from cytoray.export.hf import write_hf
from cytoray.export.provenance import (
    CHECKPOINT_DIR,
    PROVENANCE_FILE,
    TEACHER_EXPORT,
    ExportConfig,
    check_card_paths,
    find_run,
    provenance,
    read_run,
)
from cytoray.export.spec import describe
from cytoray.export.timm import write_timm
from cytoray.features.preprocess import Preprocess
from cytoray.platform.models.checkpoints import TRAIN_STATE, CheckpointError, export_dinobloom, load_model

FORMATS = ("hf", "timm", "dinobloom")
DINOBLOOM_FILE = "model.pth"


def check_formats(formats: Iterable[str]) -> list[str]:
    """Format names (each item may be comma-separated), in order, without repeats; unknown names fail."""
    chosen = [f.strip() for item in formats for f in item.split(",") if f.strip()]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise UserError(f"unknown export format {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from {', '.join(FORMATS)}")
    return list(dict.fromkeys(chosen))


def _listing(uri: str, storage_cfg) -> list[str] | None:
    """Entries of the folder ``uri`` (full paths); None when nothing is there; a file there fails."""
    fs, path = storage.filesystem(uri, storage_cfg)
    if not storage.exists(uri, storage_cfg):
        return None
    if storage.with_retries(lambda: fs.isfile(path), storage_cfg, f"stat {uri}"):
        raise UserError(f"{uri} is a file where a folder is expected; point the path at a folder")
    return storage.with_retries(lambda: fs.ls(path, detail=False), storage_cfg, f"list {uri}")


def export_model(checkpoint: str, out_uri: str, formats: Iterable[str] = FORMATS, run: str | None = None,
                 overwrite: bool = False, storage_cfg: storage.StorageConfig | None = None,
                 card_paths: str = "relative") -> dict[str, str]:
    """Write ``<out_uri>/<format>/`` for each format from ``checkpoint`` and ``<out_uri>/provenance.json``; returns
    {format: folder URI}.

    The card describes ``run`` (default: the run directory the checkpoint sits in, if any) and writes paths as
    ``card_paths`` says (relative | full | none). A non-empty format folder fails unless ``overwrite``, which
    replaces it; both are checked before the checkpoint is read."""
    targets = {fmt: storage.join_uri(out_uri, fmt) for fmt in check_formats(formats)}
    check_card_paths(card_paths)
    stale = []
    for uri in targets.values():
        if _listing(uri, storage_cfg):
            if not overwrite:
                raise UserError(f"{uri} is not empty; pass --overwrite to replace it, or choose another --out")
            stale.append(uri)
    if not storage.exists(checkpoint, storage_cfg):
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; pass a cytoray training checkpoint "
                              "directory or export, or a DINOv2 / DinoBloom .pth file")
    if run is not None and not storage.exists(run, storage_cfg):
        raise UserError(f"run directory {run} does not exist; pass the folder that holds the run's config.yaml")
    model, meta = load_model(checkpoint, storage_cfg)
    model.eval()
    record = read_run(run or find_run(checkpoint, storage_cfg), storage_cfg)
    spec, pre = describe(model), Preprocess.from_record(meta.get("preprocess"))
    for fmt, uri in targets.items():
        if uri in stale:
            fs, path = storage.filesystem(uri, storage_cfg)
            storage.with_retries(lambda fs=fs, path=path: fs.rm(path, recursive=True), storage_cfg, f"remove {uri}")
        if fmt == "hf":
            write_hf(model, pre, uri, storage_cfg)
        elif fmt == "timm":
            write_timm(model, pre, uri, storage_cfg)
        else:
            export_dinobloom(model, storage.join_uri(uri, DINOBLOOM_FILE), storage_cfg,
                             extra={k: meta[k] for k in ("step", "preset", "preprocess") if k in meta})
        card = model_card(fmt, spec, pre, meta, checkpoint, record, list(targets), card_paths)
        storage.write_bytes(storage.join_uri(uri, "README.md"), card.encode(), storage_cfg)
    full = provenance(checkpoint, meta, record, targets, card_paths)
    storage.write_bytes(storage.join_uri(out_uri, PROVENANCE_FILE), json.dumps(full, indent=2).encode(), storage_cfg)
    return targets


def final_checkpoint(run_uri: str, storage_cfg: storage.StorageConfig | None = None) -> str:
    """The run's latest step: its newest ``checkpoint_<step>/`` or ``exports/teacher_<step>.pth``, the export
    when both hold the same step (one file, no shards to gather)."""
    found = []  # (step, export first on ties, uri)
    for entry in _listing(run_uri, storage_cfg) or []:
        name = os.path.basename(entry.rstrip("/"))
        uri = storage.join_uri(run_uri, name)
        if CHECKPOINT_DIR.fullmatch(name) and storage.exists(storage.join_uri(uri, TRAIN_STATE), storage_cfg):
            found.append((int(CHECKPOINT_DIR.fullmatch(name).group(1)), 0, uri))
    for entry in _listing(storage.join_uri(run_uri, "exports"), storage_cfg) or []:
        name = os.path.basename(entry)
        if TEACHER_EXPORT.fullmatch(name):
            found.append((int(TEACHER_EXPORT.fullmatch(name).group(1)), 1, storage.join_uri(run_uri, "exports", name)))
    if not found:
        raise UserError(f"{run_uri} has no checkpoint_<step>/ and no exports/teacher_<step>.pth; is it a cytoray "
                        "pretraining run directory (run.storage_path/run.name)?")
    return max(found)[2]


def export_run(run_uri: str, out_uri: str | None = None, formats: Iterable[str] = FORMATS,
               storage_cfg: storage.StorageConfig | None = None, card_paths: str = "relative") -> dict[str, str]:
    """Export the run's final checkpoint with the run's card into ``out_uri`` (default ``<run>/exports/final``),
    replacing an earlier export there; returns {format: folder URI}."""
    return export_model(final_checkpoint(run_uri, storage_cfg),
                        out_uri or storage.join_uri(run_uri, "exports", "final"), formats, run=run_uri,
                        overwrite=True, storage_cfg=storage_cfg, card_paths=card_paths)


@dataclass
class ExportSettings:
    export: ExportConfig = field(default_factory=ExportConfig)
    storage: storage.StorageConfig = field(default_factory=storage.StorageConfig)
    log_level: str = "INFO"


def main(argv: list[str]) -> dict[str, str]:
    import argparse

    from cytoray.runtime import setup_logging

    ap = argparse.ArgumentParser(description="export a backbone for transformers, timm and DinoBloom, with a model card")
    ap.add_argument("--checkpoint", help="checkpoint URI: a cytoray training checkpoint or export, a DINOv2 / DinoBloom "
                                         "file (default with --run: the run's final checkpoint)")
    ap.add_argument("--out", help="output folder, one sub-folder per format (default with --run: <run>/exports/final)")
    ap.add_argument("--format", action="append", help=f"{' | '.join(FORMATS)}; repeatable or comma-separated "
                                                      "(default: all)")
    ap.add_argument("--run", help="run directory described by the model card (default: the checkpoint's own run)")
    ap.add_argument("--overwrite", action="store_true", help="replace format folders that are not empty")
    args, rest = ap.parse_known_args(argv)
    # relative local paths are the working directory's (as a config's locations): absolute from here on, so the
    # printed folders and a job's paths do not depend on where a process runs
    args.checkpoint, args.out, args.run = (storage.absolute(x) if x else x for x in (args.checkpoint, args.out, args.run))
    files, overrides = config.split_cli(rest)
    cfg = config.to_object(config.load_config(ExportSettings, files[0] if files else None, files[1:], overrides))
    setup_logging(cfg.log_level)
    if args.run is None and (args.checkpoint is None or args.out is None):
        raise UserError("give --checkpoint URI --out DIR, or --run RUN_DIR to export a run's final checkpoint")
    checkpoint = args.checkpoint or final_checkpoint(args.run, cfg.storage)
    out = args.out or storage.join_uri(args.run, "exports", "final")
    written = export_model(checkpoint, out, args.format or FORMATS, run=args.run, overwrite=args.overwrite,
                           storage_cfg=cfg.storage, card_paths=cfg.export.card_paths)
    for fmt, uri in written.items():
        console.say(f"{fmt}: {uri}")
    return written
