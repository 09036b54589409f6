"""The model card: a Hub ``README.md`` (YAML front matter + Markdown) written next to every exported format.

Sections: architecture, training (from the run's config), curated data (from the curation's summary), the
per-checkpoint probe table, intended use and limits, and how to load each exported format. What the run
directory does not hold is stated as missing, never guessed. Paths are written as ``export.card_paths`` says
(:class:`~cytoray.export.provenance.CardPaths`; default relative to the run, so no local path is published).
"""

from __future__ import annotations

from cytoray.eval.validation import format_results_table
from cytoray.export.hf import model_class
from cytoray.export.provenance import CardPaths, RunRecord
from cytoray.export.spec import BackboneSpec, resizes_like
from cytoray.export.timm import timm_architecture
from cytoray.features.preprocess import Preprocess

LIBRARY = {"hf": "transformers", "timm": "timm", "dinobloom": None}
HUB_ARCHS = {"vit_small": "vits14", "vit_base": "vitb14", "vit_large": "vitl14", "vit_giant2": "vitg14"}
REPO = "your-org/your-model"  # placeholder the snippets load from; the user's Hub repo id or this folder


def model_card(fmt: str, spec: BackboneSpec, pre: Preprocess, meta: dict, source: str, run: RunRecord,
               formats: list[str], card_paths: str = "relative") -> str:
    """README.md for the ``fmt`` folder of an export of ``source`` (``formats``: every folder written with it;
    ``card_paths``: relative | full | none, how the card writes paths)."""
    synthetic = bool(run.synthetic_datasets)
    preset = meta.get("preset") or (run.config or {}).get("preset")
    paths = CardPaths(card_paths, run.uri)
    parts = [front_matter(fmt, synthetic), title(spec, meta, paths(source), run, fmt),
             architecture(spec, pre, preset), training(meta, run, paths), data(run, paths),
             probes(meta, run, paths), limits(spec, synthetic), how_to_load(fmt, spec, formats)]
    return "\n\n".join(parts) + "\n"


def front_matter(fmt: str, synthetic: bool) -> str:
    tags = ["cytoray", "dinov2", "vision-transformer", "self-supervised", "hematology", "blood-smear",
            "image-feature-extraction"] + (["synthetic-data"] if synthetic else [])
    lines = ["---"]
    if LIBRARY[fmt]:
        lines.append(f"library_name: {LIBRARY[fmt]}")
    lines += ["license: other  # placeholder: set the license your training data allows before publishing",
              "pipeline_tag: image-feature-extraction", "tags:"] + [f"  - {t}" for t in tags] + ["---"]
    return "\n".join(lines)


def title(spec: BackboneSpec, meta: dict, source: str | None, run: RunRecord, fmt: str) -> str:
    name = run.uri.rstrip("/").rsplit("/", 1)[-1] if run.uri else spec.arch
    step = f"step {meta['step']}" if "step" in meta else ""
    origin = (f" Source checkpoint: `{source}`{' at ' + step if step else ''}." if source
              else f" Source checkpoint: {step}." if step else "")
    library = {"hf": "Hugging Face transformers", "timm": "timm", "dinobloom": "DinoBloom / cytoray (.pth)"}[fmt]
    return (f"# {name}: DINOv2 {spec.arch} backbone for hematology smears\n\n"
            f"Self-supervised ViT backbone (DINOv2 objective, EMA teacher) trained with cytoray on single-cell "
            f"images from blood and bone-marrow smears, exported "
            f"for {library}.{origin}\n\n"
            f"**License:** not set. The `license` field above is a placeholder: choose the license the training "
            f"datasets' terms allow before publishing.")


def architecture(spec: BackboneSpec, pre: Preprocess, preset: str | None) -> str:
    ffn = f"SwiGLU ({spec.ffn_hidden} hidden)" if spec.swiglu else f"MLP ({spec.ffn_hidden} hidden, GELU)"
    rows = [("Architecture", f"{spec.arch}, patch {spec.patch_size}"),
            ("Preset", preset or "not recorded"),
            ("Parameters", f"{spec.num_params:,} ({spec.num_params / 1e6:.1f} M)"),
            ("Embedding dim / depth / heads", f"{spec.embed_dim} / {spec.depth} / {spec.num_heads}"),
            ("FFN", ffn),
            ("Register tokens", str(spec.num_register_tokens)),
            ("LayerScale", f"init {spec.layerscale:g}" if spec.layerscale else "none"),
            ("Positional embedding", f"{spec.grid}x{spec.grid} patches + CLS ({spec.img_size} px input)"),
            ("Input", f"{pre.size}x{pre.size} px RGB, bicubic resize (no crop), /255, "
                      f"mean {list(pre.mean)}, std {list(pre.std)}"),
            ("Output", f"CLS token ({spec.embed_dim}-d, after the final LayerNorm) and {spec.embed_dim}-d patch tokens")]
    return "## Architecture\n\n" + table(["setting", "value"], rows)


def _path(shown: str | None) -> str:
    """A path as the card shows it (``CardPaths``' answer)."""
    return f"`{shown}`" if shown else "not published (export.card_paths=none)"


def _run_named(paths: CardPaths) -> str:
    """The run directory in a sentence."""
    return f"the run directory `{paths.run()}`" if paths.run() else "the run directory"


def _run_row(paths: CardPaths) -> str:
    if paths.style == "relative":
        return f"`{paths.run()}` (the paths in this card are relative to this run directory)"
    return _path(paths.run())


def training(meta: dict, run: RunRecord, paths: CardPaths) -> str:
    if run.config is None:
        where = (f"{_run_named(paths)} has no config.yaml" if run.uri
                 else "no run directory was given or found next to it")
        return f"## Training\n\nNot recorded: {where}, so the training settings of this checkpoint are unknown."
    c = run.config
    m, t = c.get("model") or {}, c.get("train") or {}
    o, a, k = m.get("optim") or {}, m.get("augment") or {}, m.get("mask") or {}
    workers = t.get("num_workers")
    batch = meta.get("global_batch") or m.get("global_batch_size")
    if batch is None and isinstance(workers, int) and m.get("batch_size_per_device"):
        batch = m["batch_size_per_device"] * workers
    g, loc = a.get("global_crops") or {}, a.get("local_crops") or {}
    obj = m.get("objective") or {}
    manifest = (c.get("data") or {}).get("manifest_uri")
    rows = [("Run", _run_row(paths)),
            ("Steps", _steps(meta.get("step", "?"), m.get("total_iters"), t.get("max_steps"),
                             t.get("schedule_to_max_steps", False))),
            ("Global batch", f"{batch} images per step" if batch else "unknown"),
            ("Optimiser", f"AdamW, base lr {o.get('base_lr')} (scaling: {o.get('lr_scaling')}), warm-up "
                          f"{o.get('warmup_iters')} steps, cosine to {o.get('min_lr')}; weight decay "
                          f"{o.get('weight_decay')} -> {o.get('weight_decay_end')}; clip {o.get('clip_grad')} "
                          + ("per student part" if o.get("clip_scope", "global") == "submodule"  # older runs: global
                             else "on the joint student norm")),
            ("Teacher", f"EMA momentum {o.get('momentum_teacher')} -> {o.get('final_momentum_teacher')}, "
                        f"temperature {o.get('warmup_teacher_temp')} -> {o.get('teacher_temp')}"),
            ("Crops", f"{g.get('number')} global {g.get('size')} px (scale {g.get('scale')}), "
                      f"{loc.get('number')} local {loc.get('size')} px (scale {loc.get('scale')})"),
            ("Objective", f"DINO {obj.get('dino_loss_weight')} + iBOT {obj.get('ibot_loss_weight')} (mask ratio "
                          f"{k.get('mask_ratio')}, p {k.get('mask_probability')}) + KoLeo "
                          f"{obj.get('koleo_loss_weight')}; {obj.get('out_dim')} prototypes, {obj.get('centering')}"),
            ("Stochastic depth", str((m.get("vit") or {}).get("drop_path_rate"))),
            ("Seed / workers", f"{t.get('seed')} / {workers}"),
            ("Initialisation", _path(paths(t["init_checkpoint"])) if t.get("init_checkpoint") else "random"),
            ("Training manifest", _path(paths(manifest)) if manifest else "not recorded")]
    return "## Training\n\n" + table(["setting", "value"], rows)


def data(run: RunRecord, paths: CardPaths) -> str:
    if run.curation is None:
        where = (f"no summary.json in {_path(paths(run.curation_uri))} (the training manifest's folder)"
                 if run.curation_uri else "the training manifest is unknown")
        return f"## Training data\n\nNot recorded: {where}, so the curated datasets behind this model are unknown."
    s = run.curation
    per = s.get("datasets") or {}
    synthetic = set(run.synthetic_datasets or ())
    rows = [(f"{name}{' (synthetic)' if name in synthetic else ''}", d["input_files"], d["kept"],
             d["sampled_images"], d["samples_per_epoch"]) for name, d in per.items()]
    tot = s.get("total") or {}
    rows.append(("**total**", tot.get("input_files"), tot.get("kept"), tot.get("sampled_images"),
                 tot.get("samples_per_epoch")))
    b = s.get("balance") or {}
    before, after = b.get("before") or {}, b.get("after") or {}
    balance = (f"Balancing: groups from `{b.get('groups_from')}` and clusters `{b.get('top_cluster_column')}`, "
               f"target {b.get('target_size')} samples per epoch, at most {b.get('max_repeat')} repeats per image; "
               f"largest dataset share {_num(before.get('largest_dataset_share'))} -> "
               f"{_num(after.get('largest_dataset_share'))}, kNN dataset mixing "
               f"{_num(before.get('knn_dataset_mixing'))} -> {_num(after.get('knn_dataset_mixing'))}."
               if b.get("enabled") else "Balancing: off (every kept image once per epoch).")
    dedup = (f"Deduplication ({s.get('embedder')} embeddings, threshold {s.get('dedup_threshold')}): "
             f"{tot.get('exact_duplicates')} exact and {tot.get('near_duplicates')} near duplicates removed, "
             f"{tot.get('leakage')} images dropped as too close to the evaluation sets "
             f"(evaluation manifests: {len(s.get('eval_manifests') or [])}, threshold {s.get('leakage_threshold')}); "
             f"{tot.get('quarantined_files')} unreadable or invalid files quarantined.")
    curated = paths(run.curation_uri)
    return (f"## Training data\n\nCurated by cytoray{f' (`{curated}`)' if curated else ''}: {len(per)} datasets.\n\n"
            + table(["dataset", "input files", "kept images", "sampled images", "samples / epoch"], rows)
            + f"\n\n{dedup}\n\n{balance}")


def probes(meta: dict, run: RunRecord, paths: CardPaths) -> str:
    if not run.probe_rows:
        where = f"{_run_named(paths)} has no eval/results.csv" if run.uri else "no run directory was given or found"
        return (f"## Evaluation\n\nNo probe results: {where}. Score the backbone with "
                f"`python recipes/probe.py --checkpoint <model.pth> --manifest <labelled manifest>`.")
    manifests = sorted({r["manifest"] for r in run.probe_rows})
    exported = f" The exported checkpoint is step {meta['step']}." if "step" in meta else ""
    return (f"## Evaluation\n\nBalanced accuracy of frozen features on labelled manifests ({', '.join(manifests)}), "
            f"for every checkpoint scored while the run trained (linear probe, kNN; ABMIL for patient-level "
            f"labels). All metrics (accuracy, balanced accuracy, weighted F1) per step are in the run's "
            f"`eval/results.csv`.{exported}\n\n```\n{format_results_table(run.probe_rows)}\n```")


def limits(spec: BackboneSpec, synthetic: bool) -> str:
    lines = ["## Intended use and limits", "",
             "- Research use only: frozen features of single-cell images from blood and bone-marrow smears, for "
             "linear probes, kNN retrieval and multiple-instance learning.",
             "- **Not for diagnosis** or any clinical decision. The model is not validated clinically and is not a "
             "medical device.",
             "- Features carry the stains, scanners and sites of the training datasets; on other laboratories "
             "they are untested until you probe them there.",
             f"- Feed images as in *Input* above. At {spec.img_size} px the positional embedding is used as "
             "stored; other sizes interpolate it (see *How to load*)."]
    if synthetic:
        lines.append("- **Synthetic data.** Some or all training datasets are synthetic smear images generated by "
                     "cytoray's demo (`cytoray.curation.synthetic`). The weights show that the pipeline runs; they "
                     "say nothing about real smears.")
    return "\n".join(lines)


def how_to_load(fmt: str, spec: BackboneSpec, formats: list[str]) -> str:
    """Three lines per exported format, this folder's first."""
    snippets = {"hf": _hf_snippet, "timm": _timm_snippet, "dinobloom": _dinobloom_snippet}
    order = [fmt] + [f for f in formats if f != fmt]
    out = ["## How to load", "",
           f"`{REPO}` stands for the Hub repository this folder is uploaded to, or the folder's local path."
           + (" Sibling folders of this export hold the other formats." if len(formats) > 1 else "")]
    for f in order:
        out += ["", snippets[f](spec, here=f == fmt)]
    return "\n".join(out)


def _hf_snippet(spec: BackboneSpec, here: bool) -> str:
    antialias = spec.num_register_tokens > 0
    note = ("identical to cytoray's at every input size" if resizes_like(spec, antialias) else
            f"identical to cytoray's at {spec.img_size} px; at other sizes transformers resizes the positional "
            f"embedding to the exact grid (bicubic{', antialiased' if antialias else ''}) while cytoray ran this "
            f"model with offset {spec.interpolate_offset:g}{', antialiased' if spec.interpolate_antialias else ''}"
            ", so features differ slightly there")
    return (f"### transformers ({'this folder' if here else 'the `hf` folder'}: `{model_class(spec)}`)\n\n"
            "```python\nfrom transformers import AutoImageProcessor, AutoModel\n"
            f'processor, model = AutoImageProcessor.from_pretrained("{REPO}"), AutoModel.from_pretrained("{REPO}")\n'
            "cls = model(**processor(images=image, return_tensors=\"pt\")).pooler_output  "
            f"# (1, {spec.embed_dim})\n```\n\nFeatures: {note}. The processor reproduces cytoray's preprocessing "
            "exactly with its PIL backend (`backend=\"pil\"`); the torchvision backend's bicubic resize differs "
            "slightly.")


def _timm_snippet(spec: BackboneSpec, here: bool) -> str:
    name, args = timm_architecture(spec)
    note = ("identical to cytoray's at every input size (with `dynamic_img_size=True`)"
            if resizes_like(spec, True) else
            f"identical to cytoray's at {spec.img_size} px; with `dynamic_img_size=True` timm resizes the "
            "positional embedding to the exact grid (bicubic, antialiased) while cytoray ran this model with offset "
            f"{spec.interpolate_offset:g}{', antialiased' if spec.interpolate_antialias else ''}, "
            "so features differ slightly at other sizes")
    extra = ", " + ", ".join(f"{k}={v}" for k, v in args.items())
    return (f"### timm ({'this folder' if here else 'the `timm` folder'}: `{name}`{extra})\n\n"
            "```python\nimport timm\n"
            f'model = timm.create_model("hf-hub:{REPO}", pretrained=True).eval()  # local: "local-dir:<folder>"\n'
            "cls = model(timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))(image)[None])"
            f"  # (1, {spec.embed_dim})\n```\n\nFeatures: {note}. timm's transform resizes the short side and "
            "center-crops, which equals cytoray's resize for square cell crops.")


def _dinobloom_snippet(spec: BackboneSpec, here: bool) -> str:
    out = (f"### cytoray / DinoBloom `.pth` ({'this folder' if here else 'the `dinobloom` folder'}: `model.pth`)\n\n"
           "```python\nfrom cytoray.platform.models.checkpoints import load_model\n"
           'model, meta = load_model("model.pth")  # architecture and preprocessing from the file\n'
           f"cls = model(x)  # x: (B, 3, H, W) prepared as meta['preprocess'] says -> (B, {spec.embed_dim})\n```")
    hub = HUB_ARCHS.get(spec.arch)
    if hub and spec.patch_size == 14 and spec.num_register_tokens in (0, 4) and spec.layerscale:
        entry = f"dinov2_{hub}{'_reg' if spec.num_register_tokens else ''}"
        out += ("\n\nWithout cytoray, as DinoBloom's weights are loaded (the file holds "
                "`{\"teacher\": {\"backbone.<DINOv2 name>\": tensor}}`):\n\n"
                "```python\nimport torch\n"
                f'model = torch.hub.load("facebookresearch/dinov2", "{entry}", pretrained=False, '
                f"img_size={spec.img_size})\n"
                'model.load_state_dict({k.removeprefix("backbone."): v for k, v in '
                'torch.load("model.pth", weights_only=True)["teacher"].items()})\n```')
    return out


def table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _steps(step, total_iters, max_steps, to_max_steps: bool) -> str:
    """``2 (schedules span 300 steps; the run stops at 40)``, or the schedules' span is max_steps
    (``train.schedule_to_max_steps``)."""
    if max_steps and total_iters and to_max_steps and max_steps < total_iters:
        return (f"{step} (schedules span train.max_steps={max_steps} steps, not {total_iters}, warm-ups scaled alike: "
                "train.schedule_to_max_steps)")
    return f"{step} (schedules span {total_iters} steps" + (f"; the run stops at {max_steps})" if max_steps else ")")


def _num(x) -> str:
    """Two decimals; None as ``?``; a score's "n/a (...)" reason as it is."""
    return "?" if x is None else x if isinstance(x, str) else f"{x:.2f}"
