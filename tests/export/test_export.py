"""Exports: transformers and timm load the backbone and give cytoray's features; the DinoBloom file round-trips;
the model card reports what the run holds (and what it lacks); export_run on a real training checkpoint;
the recipe's error lines."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import yaml

from cytoray import config, storage
from cytoray.console import run_recipe
from cytoray.errors import UserError
from cytoray.eval import validation
from cytoray.export import export_model, export_run
from cytoray.export.exporter import final_checkpoint, main
from cytoray.export.spec import describe
from cytoray.export.timm import timm_architecture, timm_state_dict
from cytoray.features.preprocess import Preprocess
from cytoray.platform.models import vit
from cytoray.platform.models.checkpoints import CheckpointError, export_dinobloom, load_model

PRE = Preprocess(size=64, mean=(0.7, 0.6, 0.5), std=(0.2, 0.25, 0.3))
META = {"step": 2, "preset": "debug", "preprocess": PRE.record()}


def _model(arch="vit_debug", **cfg):
    """A small backbone with every tensor non-trivial (LayerScale, tokens, pos_embed)."""
    torch.manual_seed(0)
    m = vit.build_vit(vit.ViTConfig(arch=arch, patch_size=8, img_size=64, **{"layerscale": 0.1, **cfg}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def _checkpoint(tmp_path, model, name="model.pth", hub=False):
    """A cytoray export of ``model``; ``hub``: a flat DINOv2 hub-style state dict (settings read off the tensors)."""
    path = str(tmp_path / name)
    if hub:
        torch.save(model.state_dict(), path)
    else:
        export_dinobloom(model, path, extra=META)
    return path


def _tokens(model, x):
    """(B, 1 + R + N, D): normalised CLS, register and patch tokens, in the libraries' order."""
    with torch.no_grad():
        f = model.forward_features(x)
    return torch.cat([f["x_norm_clstoken"][:, None], f["x_norm_regtokens"], f["x_norm_patchtokens"]], dim=1)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def swiglu_arch(monkeypatch):
    """A 2-block ViT with giant's SwiGLU FFN, small enough for CPU (vit_giant2 itself has 1.1 B parameters)."""
    monkeypatch.setitem(vit.ARCHS, "vit_debug_swiglu", (64, 2, 2, "swiglu"))
    return "vit_debug_swiglu"


# (case, ViT options, input sizes checked, model class): the stored grid is 8x8 (64 px). transformers resizes the
# pos_embed to the exact grid, bicubic (with registers: antialiased), which is cytoray's offset-0 resize; the
# registers case is a DINOv2 hub-style file, which load_model runs as DINOv2's _reg models (offset 0, antialiased).
HF_CASES = [
    ("plain", {}, [(64, 64)], "Dinov2Model"),
    ("registers", dict(num_register_tokens=4), [(64, 64), (96, 96), (40, 40), (64, 96)], "Dinov2WithRegistersModel"),
    ("swiglu", {}, [(64, 64)], "Dinov2Model"),
    ("no LayerScale", dict(layerscale=0.0), [(64, 64)], "Dinov2Model"),
    ("other sizes", dict(interpolate_offset=0.0), [(96, 96), (48, 48), (64, 96)], "Dinov2Model"),
]


@pytest.mark.parametrize("case,options,sizes,cls_name", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_transformers_loads_the_export_with_cytorays_features(tmp_path, request, case, options, sizes, cls_name):
    transformers = pytest.importorskip("transformers")
    model = _model(request.getfixturevalue("swiglu_arch") if case == "swiglu" else "vit_debug", **options)
    source = _checkpoint(tmp_path, model, hub=case == "registers")
    if case == "registers":
        model = load_model(source)[0].eval()
        assert (model.cfg.interpolate_offset, model.cfg.interpolate_antialias) == (0.0, True)
    out = export_model(source, str(tmp_path / "out"), ["hf"])["hf"]
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    hf, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == cls_name
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.use_swiglu_ffn == (case == "swiglu") and hf.config.layer_norm_eps == 1e-6
    hf.eval()
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            got = hf(pixel_values=x)
        ref = _tokens(model, x)
        assert got.last_hidden_state.shape == ref.shape
        assert _rel(got.pooler_output, ref[:, 0]) <= 1e-5, (case, h, w)  # CLS
        assert _rel(got.last_hidden_state, ref) <= 1e-5, (case, h, w)  # CLS, registers, patches


def test_transformers_resizes_the_pos_embed_differently_from_dinov2s_offset(tmp_path):
    """What docs/export.md states: cytoray's default offset 0.1 (DINOv2's) gives other features off the stored
    grid than transformers' exact-grid resize; at the stored grid they are the same."""
    transformers = pytest.importorskip("transformers")
    model = _model()
    out = export_model(_checkpoint(tmp_path, model), str(tmp_path / "out"), ["hf"])["hf"]
    hf = transformers.Dinov2Model.from_pretrained(out).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        diff = _rel(hf(pixel_values=x).last_hidden_state, _tokens(model, x))
    assert 1e-4 < diff < 0.1
    readme = open(os.path.join(out, "README.md")).read()
    assert "identical to cytoray's at 64 px; at other sizes transformers resizes" in readme


def test_transformers_image_processor_is_cytorays_preprocessing(tmp_path):
    transformers = pytest.importorskip("transformers")
    import numpy as np
    from PIL import Image

    out = export_model(_checkpoint(tmp_path, _model()), str(tmp_path / "out"), ["hf"])["hf"]
    processor = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    rng = np.random.default_rng(0)
    for shape in [(80, 80, 3), (50, 70, 3), (64, 64, 3)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        got = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        assert got.shape == (1, 3, 64, 64)
        assert (got - PRE([image])).abs().max().item() < 1e-5


# timm's VisionTransformer state dict for vit_small_patch14_dinov2 / _reg4_ at img_size=224, recorded from
# timm/models/vision_transformer.py (timm 1.0.x): everything outside the blocks, and block 0 (blocks 1-11 alike).
TIMM_SMALL = {"cls_token": (1, 1, 384), "pos_embed": (1, 257, 384), "patch_embed.proj.weight": (384, 3, 14, 14),
              "patch_embed.proj.bias": (384,), "norm.weight": (384,), "norm.bias": (384,)}
TIMM_SMALL_REG4 = {**TIMM_SMALL, "reg_token": (1, 4, 384), "pos_embed": (1, 256, 384)}
TIMM_BLOCK = {"norm1.weight": (384,), "norm1.bias": (384,), "attn.qkv.weight": (1152, 384), "attn.qkv.bias": (1152,),
              "attn.proj.weight": (384, 384), "attn.proj.bias": (384,), "ls1.gamma": (384,), "norm2.weight": (384,),
              "norm2.bias": (384,), "mlp.fc1.weight": (1536, 384), "mlp.fc1.bias": (1536,),
              "mlp.fc2.weight": (384, 1536), "mlp.fc2.bias": (384,), "ls2.gamma": (384,)}


@pytest.mark.parametrize("registers,name,expected", [(0, "vit_small_patch14_dinov2", TIMM_SMALL),
                                                     (4, "vit_small_patch14_reg4_dinov2", TIMM_SMALL_REG4)])
def test_timm_layout_is_timms(registers, name, expected):
    with torch.device("meta"):
        model = vit.build_vit(vit.ViTConfig(arch="vit_small", num_register_tokens=registers))
    sd = timm_state_dict(model)
    want = dict(expected, **{f"blocks.{i}.{k}": s for i in range(12) for k, s in TIMM_BLOCK.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == want
    assert timm_architecture(describe(model), 224) == (name, {"img_size": 224})


def test_timm_names_other_archs_by_their_model_args(swiglu_arch):
    spec = describe(_model(swiglu_arch, num_register_tokens=2))
    name, args = timm_architecture(spec, 96)
    assert name == "vit_giant_patch14_reg4_dinov2"
    # timm's SwiGLUPacked hidden = int(dim * mlp_ratio) must be 2 x cytoray's per-branch width (176)
    assert int(64 * args.pop("mlp_ratio")) == 2 * spec.ffn_hidden == 352
    assert args == dict(patch_size=8, embed_dim=64, depth=2, num_heads=2, init_values=0.1, reg_tokens=2,
                        img_size=64, dynamic_img_size=True)


# What timm reads from a hub config.json, recorded from timm 1.0.29's source (timm/models/_hub.py
# _parse_model_cfg: architecture, num_classes, model_args, pretrained_cfg; _builder.py builds
# PretrainedCfg(**pretrained_cfg), so an unknown key fails; vision_transformer.py: VisionTransformer's keyword
# arguments and the DINOv2 entry points' model_args). Checked here without timm, which cannot be installed beside
# the CPU torch (docs/export.md, "timm").
TIMM_PRETRAINED_CFG_FIELDS = {
    "url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag", "custom_load",
    "input_size", "test_input_size", "min_input_size", "fixed_input_size", "interpolation", "crop_pct",
    "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "label_offset", "label_names", "label_descriptions",
    "pool_size", "test_pool_size", "first_conv", "classifier", "license", "description", "origin_url", "paper_name",
    "paper_ids", "notes"}
TIMM_VIT_ARGS = {
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads", "mlp_ratio",
    "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values", "class_token",
    "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm", "pool_include_prefix",
    "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate",
    "attn_drop_rate", "drop_path_rate", "weight_init", "fix_init", "embed_layer", "embed_norm_layer", "norm_layer",
    "act_layer", "block_fn", "mlp_layer", "attn_layer", "device", "dtype"}
_DINOV2 = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16), "giant": (1536, 40, 24)}
TIMM_DINOV2_ENTRY_POINTS = {  # model_args of each entry point (giant's mlp_layer / act_layer: SwiGLUPacked, SiLU)
    f"vit_{size}_patch14_{reg}dinov2": dict(patch_size=14, embed_dim=d, depth=n, num_heads=h, init_values=1e-5,
                                             **(dict(mlp_ratio=2.66667 * 2) if size == "giant" else {}),
                                             **(dict(reg_tokens=4, no_embed_class=True) if reg else {}))
    for size, (d, n, h) in _DINOV2.items() for reg in ("", "reg4_")}


@pytest.mark.parametrize("case,options", [("plain", {}), ("registers", dict(num_register_tokens=4)),
                                          ("swiglu", {}), ("no LayerScale", dict(layerscale=0.0))])
def test_timm_config_json_is_what_timms_dinov2_loader_reads(tmp_path, swiglu_arch, case, options):
    from cytoray.export.timm import TIMM_ARCHS

    assert TIMM_ARCHS == TIMM_DINOV2_ENTRY_POINTS
    model = _model(swiglu_arch if case == "swiglu" else "vit_debug", **options)
    out = export_model(_checkpoint(tmp_path, model), str(tmp_path / "out"), ["timm"])["timm"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert {"architecture", "num_classes", "model_args", "pretrained_cfg"} <= set(cfg) and cfg["num_classes"] == 0
    assert set(cfg["pretrained_cfg"]) <= TIMM_PRETRAINED_CFG_FIELDS, set(cfg["pretrained_cfg"]) - TIMM_PRETRAINED_CFG_FIELDS
    assert set(cfg["model_args"]) <= TIMM_VIT_ARGS, set(cfg["model_args"]) - TIMM_VIT_ARGS
    # the model timm builds: the entry point's arguments, then config.json's
    args = {**TIMM_DINOV2_ENTRY_POINTS[cfg["architecture"]], **cfg["model_args"]}
    spec = describe(model)
    assert (args["patch_size"], args["embed_dim"], args["depth"], args["num_heads"], args["img_size"]) == (8, 64, 2, 2, 64)
    assert args.get("reg_tokens", 0) == spec.num_register_tokens and args.get("no_embed_class", False) == (case == "registers")
    assert ("giant" in cfg["architecture"]) == (case == "swiglu")
    if case == "swiglu":  # timm's SwiGLUPacked: hidden = int(dim * mlp_ratio) = 2 x cytoray's per-branch width
        assert int(64 * args["mlp_ratio"]) == 2 * spec.ffn_hidden
    assert args["init_values"] == (0.1 if case != "no LayerScale" else 1e-5)  # gamma's init; the weights replace it
    p = cfg["pretrained_cfg"]  # timm's DINOv2 data config, with cytoray's preprocessing
    assert (p["input_size"], p["interpolation"], p["crop_pct"], p["num_classes"]) == ([3, 64, 64], "bicubic", 1.0, 0)
    assert (tuple(p["mean"]), tuple(p["std"]), p["first_conv"]) == (PRE.mean, PRE.std, "patch_embed.proj")


@pytest.mark.timm
@pytest.mark.parametrize("case", ["plain", "registers", "swiglu", "no LayerScale"])
def test_timm_loads_the_export_with_cytorays_features(tmp_path, swiglu_arch, case):
    timm = pytest.importorskip("timm")
    options = {"registers": dict(num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True),
               "no LayerScale": dict(layerscale=0.0)}.get(case, {})
    model = _model(swiglu_arch if case == "swiglu" else "vit_debug", **options)
    out = export_model(_checkpoint(tmp_path, model), str(tmp_path / "out"), ["timm"])["timm"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    by_file = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                                pretrained_cfg_overlay=dict(file=os.path.join(out, "model.safetensors")))
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 3, 64, 64)
    ref = _tokens(model, x)
    for t in (by_file.eval(), by_dir.eval()):
        with torch.no_grad():
            assert _rel(t.forward_features(x), ref) <= 1e-5
            assert _rel(t(x), ref[:, 0]) <= 1e-5  # num_classes=0: the pooled CLS token
    if case == "registers":  # offset 0, antialiased: timm's dynamic resize is cytoray's at every size
        dynamic = timm.create_model(f"local-dir:{out}", pretrained=True, dynamic_img_size=True).eval()
        for h, w in [(96, 96), (40, 40), (64, 96)]:
            x = torch.randn(2, 3, h, w)
            with torch.no_grad():
                assert _rel(dynamic.forward_features(x), _tokens(model, x)) <= 1e-5, (h, w)
    assert tuple(timm.data.resolve_data_config({}, model=by_dir)["mean"]) == PRE.mean


def test_dinobloom_export_round_trips_through_load_model(tmp_path):
    model = _model(num_register_tokens=4)
    out = export_model(_checkpoint(tmp_path, model), str(tmp_path / "out"), ["dinobloom"])["dinobloom"]
    assert sorted(os.listdir(out)) == ["README.md", "model.pth"]
    back, meta = load_model(os.path.join(out, "model.pth"))
    assert back.cfg == model.cfg and {k: meta[k] for k in META} == META
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    raw = torch.load(os.path.join(out, "model.pth"), weights_only=True)
    assert set(raw) == {"teacher", "cytoray"} and all(k.startswith("backbone.") for k in raw["teacher"])


INIT = "/opt/shared/weights/dinov2_vits14_pretrain.pth"  # a local file far from the run


def _local_paths(text: str) -> list[str]:
    """Absolute local paths (and ~/ paths) in ``text``; "/255" or "samples / epoch" are not paths."""
    return re.findall(r"(?<![\w.:/-])(?:~|/[A-Za-z_][\w.-]*)/[\w.-]+", text)


def _fake_run(tmp_path):
    """A run directory as pretraining leaves it (config.yaml, eval/results.csv) and the curation beside it
    (summary.json, and a config.yaml naming one dataset of a synthetic collection), written by the real writers
    where they are callable without training."""
    from cytoray.platform.config import load_pretrain_config

    curate, data, run = tmp_path / "curate", tmp_path / "data", str(tmp_path / "runs" / "r1")
    cfg = load_pretrain_config([f"data.manifest_uri={curate}/manifest.parquet", "run.name=r1",
                                f"run.storage_path={tmp_path / 'runs'}", "train.num_workers=2", "train.seed=7",
                                f"train.init_checkpoint={INIT}"], "debug")
    config.save_config(cfg, run)
    for step, acc in [(1, 0.5), (2, 0.75)]:
        results = [{"images": 40, "methods": {m: {"accuracy": acc, "balanced_accuracy": acc, "weighted_f1": acc}
                                              for m in ("linear", "knn20")}}]
        rows = validation.table_rows(step, f"{run}/checkpoint_{step:08d}", results, ["acevedo"])
        storage.write_bytes(f"{run}/eval/checkpoint_{step:08d}.json", json.dumps({"rows": rows}).encode())
    validation.write_results_table(run)
    os.makedirs(data / "acevedo")
    (data / "ground_truth.parquet").write_bytes(b"")  # the synthetic collection's ground truth sits beside its datasets
    storage.write_bytes(f"{curate}/config.yaml", yaml.safe_dump(
        {"datasets": [{"name": "acevedo", "uri": str(data / "acevedo")}, {"name": "lab", "uri": "/elsewhere/lab"}]}
    ).encode())
    per = {name: {"input_files": n + 3, "quarantined_files": 1, "kept_files": n + 2, "images": n + 2, "kept": n,
                  "sampled_images": n // 2, "samples_per_epoch": n} for name, n in [("acevedo", 120), ("lab", 80)]}
    summary = {"datasets": per, "total": {"input_files": 206, "quarantined_files": 2, "kept": 200, "sampled_images": 100,
                                          "samples_per_epoch": 200, "exact_duplicates": 3, "near_duplicates": 1,
                                          "leakage": 2},
               "embedder": "handcrafted", "dedup_threshold": 0.985, "leakage_threshold": 0.975,
               "eval_manifests": ["eval.parquet"],
               "balance": {"enabled": True, "target_size": 200, "max_repeat": 4, "groups_from": "dataset",
                           "top_cluster_column": "cluster_l3",
                           "before": {"largest_dataset_share": 0.6, "knn_dataset_mixing": 0.31},
                           "after": {"largest_dataset_share": 0.5, "knn_dataset_mixing": 0.44}}}
    storage.write_bytes(f"{curate}/summary.json", json.dumps(summary).encode())
    return run


def test_model_card_reports_the_run(tmp_path):
    run = _fake_run(tmp_path)
    model = _model()
    checkpoint = f"{run}/exports/teacher_00000002.pth"
    export_dinobloom(model, checkpoint, extra=META)
    written = export_model(checkpoint, str(tmp_path / "out"))  # the run is found from the checkpoint's place
    cards = {fmt: open(os.path.join(uri, "README.md")).read() for fmt, uri in written.items()}
    # a card is published as it is: paths relative to the run, never the local ones (export.card_paths=relative)
    for fmt, card in cards.items():
        assert not _local_paths(card) and str(tmp_path) not in card, (fmt, _local_paths(card))
    full = json.load(open(tmp_path / "out" / "provenance.json"))  # beside the format folders: stays local
    assert (full["checkpoint"], full["run"], full["init_checkpoint"]) == (checkpoint, run, INIT)
    assert full["training_manifest"] == f"{tmp_path}/curate/manifest.parquet" and full["formats"] == written
    assert cards["hf"].startswith("---\nlibrary_name: transformers\nlicense: other  # placeholder")
    assert cards["timm"].startswith("---\nlibrary_name: timm\n") and "library_name" not in cards["dinobloom"]
    card = cards["hf"]
    for text in [f"| Parameters | {describe(model).num_params:,} (0.1 M) |", "| Embedding dim / depth / heads | 64 / 2 / 2 |",
                 "| Register tokens | 0 |", "| Preset | debug |", "| Steps | 2 (schedules span 300 steps) |",
                 "| Run | `r1` (the paths in this card are relative to this run directory) |",
                 "Source checkpoint: `exports/teacher_00000002.pth` at step 2.",
                 "| Training manifest | `../../curate/manifest.parquet` |", "Curated by cytoray (`../../curate`)",
                 "| Initialisation | `dinov2_vits14_pretrain.pth` |",
                 "| Global batch | 64 images per step |", "base lr 0.001 (scaling: none)",
                 "2 global 64 px (scale [0.32, 1.0]), 2 local 32 px", "| Seed / workers | 7 / 2 |",
                 "| acevedo (synthetic) | 123 | 120 | 60 | 120 |", "| lab | 83 | 80 | 40 | 80 |",
                 "3 exact and 1 near duplicates", "2 images dropped as too close to the evaluation sets",
                 "largest dataset share 0.60 -> 0.50, kNN dataset mixing 0.31 -> 0.44",
                 "Balanced accuracy of frozen features on labelled manifests (acevedo)",
                 "The exported checkpoint is step 2.", "**Not for diagnosis**", "**Synthetic data.**",
                 "mean [0.7, 0.6, 0.5], std [0.2, 0.25, 0.3]", "AutoModel.from_pretrained", "timm.create_model",
                 'load_model("model.pth")', "  - synthetic-data"]:
        assert text in card, text
    table = card[card.index("    step"):]
    assert "       1                  0.500                  0.500" in table
    assert "       2                  0.750                  0.750" in table
    assert cards["timm"].index("### timm (this folder") < cards["timm"].index("### transformers (the `hf` folder")


def test_model_card_says_what_is_missing(tmp_path):
    out = export_model(_checkpoint(tmp_path, _model()), str(tmp_path / "out"), ["hf"])["hf"]
    card = open(os.path.join(out, "README.md")).read()
    assert "Not recorded: no run directory was given or found next to it" in card
    assert "Not recorded: the training manifest is unknown" in card
    assert "No probe results: no run directory was given or found" in card
    assert "Synthetic data" not in card and "synthetic-data" not in card and "### timm" not in card
    bare = tmp_path / "bare_run"
    bare.mkdir()
    out = export_model(_checkpoint(tmp_path, _model()), str(tmp_path / "out2"), ["dinobloom"], run=str(bare))
    card = open(os.path.join(out["dinobloom"], "README.md")).read()
    assert "the run directory `bare_run` has no config.yaml" in card
    assert "the run directory `bare_run` has no eval/results.csv" in card


def test_card_paths_full_or_none_and_the_recipe_key(tmp_path, capfd):
    run = _fake_run(tmp_path)
    checkpoint = f"{run}/exports/teacher_00000002.pth"
    export_dinobloom(_model(), checkpoint, extra=META)
    out = export_model(checkpoint, str(tmp_path / "full"), ["hf"], card_paths="full")["hf"]
    card = open(os.path.join(out, "README.md")).read()
    for text in [f"Source checkpoint: `{checkpoint}` at step 2.", f"| Run | `{run}` |", f"| Initialisation | `{INIT}` |",
                 f"| Training manifest | `{tmp_path}/curate/manifest.parquet` |"]:
        assert text in card, text
    assert len(_local_paths(card)) >= 4  # what the default keeps out of published cards
    out = export_model(checkpoint, str(tmp_path / "none"), ["hf"], card_paths="none")["hf"]
    card = open(os.path.join(out, "README.md")).read()
    assert not _local_paths(card) and "teacher_00000002" not in card and "curate" not in card
    for text in ["Source checkpoint: step 2.", "| Run | not published (export.card_paths=none) |",
                 "| Training manifest | not published (export.card_paths=none) |", "Curated by cytoray: 2 datasets."]:
        assert text in card, text
    code, _, err = _recipe(["--checkpoint", checkpoint, "--out", str(tmp_path / "bad"), "export.card_paths=local"],
                           capfd)
    assert code == 1 and err[0].startswith("cytoray: error: export.card_paths='local': choose one of relative, full, "
                                           "none") and not (tmp_path / "bad").exists()
    code, _, _ = _recipe(["--checkpoint", checkpoint, "--out", str(tmp_path / "cli"), "export.card_paths=full"], capfd)
    assert code == 0 and f"| Run | `{run}` |" in open(tmp_path / "cli" / "hf" / "README.md").read()


def test_export_run_exports_the_final_training_checkpoint(tmp_path, capfd, monkeypatch):
    """A real sharded checkpoint (the training loop's save_sharded, in one process) beats an older export."""
    from cytoray.platform import checkpointing
    from cytoray.platform.config import load_preset
    from cytoray.platform.objective import DINOv2Objective
    from cytoray.platform.step import build_optimizer

    torch.manual_seed(0)
    p = load_preset("debug")
    objective = DINOv2Objective(p.vit, p.objective)
    optimizer = build_optimizer(objective, p.optim.layer_decay, p.optim.patch_embed_lr_mult)
    run = str(tmp_path / "run")
    os.makedirs(f"{run}/checkpoint_00000004")
    checkpointing.save_sharded(f"{run}/checkpoint_00000004", objective, optimizer,
                               {"step": 4, "global_batch": 8, "seed": 0, "preset": "debug", "vit": asdict(p.vit),
                                "preprocess": PRE.record()}, rank=0)
    export_dinobloom(_model(), f"{run}/exports/teacher_00000002.pth", extra=META)  # older: not chosen
    assert final_checkpoint(run) == f"{run}/checkpoint_00000004"
    written = export_run(run, formats=["dinobloom", "hf"])
    assert written == {"dinobloom": f"{run}/exports/final/dinobloom", "hf": f"{run}/exports/final/hf"}
    back, meta = load_model(f"{run}/exports/final/dinobloom/model.pth")
    teacher = objective.teacher["backbone"]
    assert meta["step"] == 4 and meta["preprocess"] == PRE.record()
    for k, v in teacher.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert export_run(run, formats=["dinobloom"]) == {"dinobloom": f"{run}/exports/final/dinobloom"}  # reruns replace
    export_dinobloom(_model(), f"{run}/exports/teacher_00000004.pth", extra=META)
    assert final_checkpoint(run) == f"{run}/exports/teacher_00000004.pth"  # same step: the single file
    code, stdout, _ = _recipe(["--run", run, "--format", "timm", "--overwrite"], capfd)
    assert code == 0 and stdout.splitlines() == [f"timm: {run}/exports/final/timm"]
    monkeypatch.chdir(tmp_path)  # relative paths, as typed: the working directory's, printed absolute
    code, stdout, _ = _recipe(["--run", "run", "--format", "timm", "--overwrite"], capfd)
    assert code == 0 and stdout.splitlines() == [f"timm: {run}/exports/final/timm"]


def test_export_to_object_storage(tmp_path, s3):
    model = _model()
    out = "s3://cytoray-test/exports/m1"
    written = export_model(_checkpoint(tmp_path, model), out, ["hf", "dinobloom"], storage_cfg=s3)
    fs, path = storage.filesystem(out, s3)
    assert sorted(os.path.basename(f) for f in fs.ls(f"{path}/hf", detail=False)) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]
    back, _ = load_model(f"{written['dinobloom']}/model.pth", s3)
    assert torch.equal(back.pos_embed, model.pos_embed)
    with pytest.raises(UserError, match=f"{out}/hf is not empty; pass --overwrite"):
        export_model(_checkpoint(tmp_path, model), out, ["hf"], storage_cfg=s3)


def _recipe(argv, capfd):
    """(exit code, the lines said before the closing 'full log:' line, stderr lines)."""
    code = run_recipe(main, argv)
    captured = capfd.readouterr()
    said = captured.out.splitlines()
    assert said[-1].startswith("full log: ")
    return code, "\n".join(said[:-1]), captured.err.strip().splitlines()


def test_recipe_prints_one_line_per_format_and_fails_in_one_line(tmp_path, capfd):
    ckpt, out = _checkpoint(tmp_path, _model()), str(tmp_path / "out")
    code, stdout, _ = _recipe(["--checkpoint", ckpt, "--out", out, "--format", "hf,dinobloom"], capfd)
    assert code == 0 and stdout.splitlines() == [f"hf: {out}/hf", f"dinobloom: {out}/dinobloom"]

    code, _, err = _recipe(["--checkpoint", ckpt, "--out", out, "--format", "onnx"], capfd)
    assert code == 1 and err[0] == "cytoray: error: unknown export format 'onnx'; choose from hf, timm, dinobloom"
    code, _, err = _recipe(["--checkpoint", ckpt, "--out", out, "--format", "hf"], capfd)
    assert code == 1 and err[0] == f"cytoray: error: {out}/hf is not empty; pass --overwrite to replace it, or " \
                                   "choose another --out"
    code, _, err = _recipe(["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o2")], capfd)
    assert code == 1 and err[0].startswith(f"cytoray: error: checkpoint {tmp_path / 'nope.pth'} does not exist; pass")
    code, _, err = _recipe(["--out", out], capfd)
    assert code == 1 and "--run RUN_DIR" in err[0]

    stale = os.path.join(out, "hf", "stale.bin")
    open(stale, "w").close()
    code, stdout, _ = _recipe(["--checkpoint", ckpt, "--out", out, "--format", "hf", "--overwrite"], capfd)
    assert code == 0 and stdout.splitlines() == [f"hf: {out}/hf"] and not os.path.exists(stale)


def test_bad_checkpoint_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="unrecognised layout"):
        export_model(str(bad), str(tmp_path / "out"), ["hf"])


def test_export_package_imports_without_ray():
    import cytoray

    code = "import sys, cytoray.export.exporter; assert 'ray' not in sys.modules, 'ray imported'"
    root = os.path.dirname(os.path.dirname(cytoray.__file__))
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})
