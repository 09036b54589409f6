"""Write a synthetic smear collection: several datasets in their published layouts, planted near-duplicates
and bad files, and a ground-truth table of all of it.

    python -m cytoray.curation.synthetic.collection OUT_DIR --images 2000 --seed 0

Output under ``OUT_DIR``:
    <dataset>/...             one folder per dataset, in its layout
    datasets.yaml             the curate recipe's ``datasets:`` list for this collection
    ground_truth.parquet      image_id, dataset, relpath, kind, true_class, duplicate_of, transform,
                              expected_reason, patient_id, patient_label

``kind`` is ``original``, ``exact_duplicate`` (same decoded pixels, other encoding), ``near_duplicate``
(a re-export: ``NEAR_TRANSFORMS``, parameters drawn by ``synthetic.copies``), ``crop`` (a cell in a detection or
segmentation field) or ``bad`` (with the quarantine reason ingestion must give).
Everything is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from cytoray.curation.synthetic.layouts import PLANNERS, STYLES, Item, Plan, encode, render_item

# Dataset name -> (layout, share of the collection). BMC and AML Hehr dominate, as in DinoBloom's data.
DEFAULT_DATASETS = {
    "acevedo": ("acevedo", 0.08), "matek": ("matek", 0.08), "bmc": ("bmc", 0.30), "raabin": ("raabin", 0.06),
    "lisc": ("lisc", 0.03), "aml_hehr": ("aml_hehr", 0.25), "apl_aml": ("apl_aml", 0.06),
    "bccd": ("bccd", 0.02), "segpc": ("segpc", 0.02), "private": ("class_folders", 0.05),
    "table_set": ("table", 0.05),
}
FIELD_LAYOUTS = {"bccd", "segpc"}  # one file per field; cells are cropped at ingestion
EXT_FMT = {"jpg": "jpg", "jpeg": "jpg", "tif": "tiff", "tiff": "tiff", "bmp": "bmp", "png": "png"}
# re-exports of a published image (``synthetic.copies``); a box beyond the image needs the smear field, which a
# published image does not come with
NEAR_TRANSFORMS = ("reencode", "flip", "rot90", "crop_one_side", "crop_two_sides", "downscale", "upscale", "blur",
                   "colour", "stain", "combo")
BAD_KINDS = ("empty_file", "truncated", "not_an_image", "too_small", "too_large")


@dataclass
class CollectionSpec:
    images: int = 1000  # approximate total number of image files
    seed: int = 0
    near_duplicate_rate: float = 0.04  # fraction of originals that get a near-duplicate copy
    exact_duplicate_rate: float = 0.01
    cross_dataset_share: float = 0.4  # of duplicates, the share written into another dataset
    bad_files_per_dataset: int = 5  # each dataset gets this many bad files, cycling through BAD_KINDS
    workers: int = 0  # processes for rendering (0 = all cores)


def _transform(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate of ``img``: what re-uploads and re-exports of the same cell look like (``copies.make_copy``
    with the image as its own field: another box can only be inside it)."""
    from cytoray.curation.synthetic.copies import make_copy

    h, w = img.shape[:2]
    return make_copy(img, (0, 0, w, h), kind, rng)[0]


def _fmt_of(relpath: str) -> str:
    return EXT_FMT[relpath.rsplit(".", 1)[-1].lower()]


def _write(root: str, relpath: str, data: bytes) -> None:
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _render_and_write(args) -> None:
    root, layout, items = args
    style = STYLES[layout]
    for it, extra in items:
        img = render_item(it, style) if extra is None else _derived_pixels(extra)
        fmt = it.fmt or _fmt_of(it.relpath)
        q = extra.get("quality", style.jpeg_quality) if extra else style.jpeg_quality
        _write(root, it.relpath, encode(img, fmt, q, it.mode))


def _derived_pixels(extra: dict) -> np.ndarray:
    """Pixels of a duplicate: the original re-rendered from its seed, transformed, at the target's size."""
    src, style = extra["source"], STYLES[extra["source_layout"]]
    img = render_item(src, style)
    if extra["kind"] == "exact_duplicate":  # the original's decoded pixels, stored losslessly
        data = encode(img, src.fmt or _fmt_of(src.relpath), style.jpeg_quality, src.mode)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    img = _transform(img, extra["transform"], np.random.default_rng(extra["seed"]))
    if extra["target_width"]:  # re-published in another source: rescaled to its width, aspect kept
        w = extra["target_width"]
        img = np.asarray(Image.fromarray(img).resize((w, max(1, round(img.shape[0] * w / img.shape[1]))), Image.BICUBIC))
    return img


def _png_with_huge_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height but carries almost no data (a decompression bomb's shape)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_file(kind: str, fmt: str, rng: np.random.Generator) -> bytes:
    if kind == "empty_file":
        return b""
    if kind == "not_an_image":
        return b"Sample ID;Stain;Comment\nthis is a spreadsheet export saved with an image extension\n"
    if kind == "too_small":
        return encode(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8), fmt)
    if kind == "too_large":
        return _png_with_huge_header(60000, 60000)
    if kind == "truncated":
        img = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        data = encode(img, fmt if fmt != "bmp" else "png")
        return data[: len(data) // 2]
    raise ValueError(kind)


def _gt_row(dataset, relpath, kind, true_class=None, duplicate_of=None, transform=None, expected_reason=None,
            patient_id=None, patient_label=None, index=None):
    image_id = f"{dataset}/{relpath}" + (f"#{index}" if index is not None else "")
    return dict(image_id=image_id, dataset=dataset, relpath=relpath, kind=kind, true_class=true_class,
                duplicate_of=duplicate_of, transform=transform, expected_reason=expected_reason,
                patient_id=patient_id, patient_label=patient_label)


def generate_collection(out_dir: str, spec: CollectionSpec | None = None,
                        datasets: dict[str, tuple[str, float]] | None = None) -> dict:
    """Write the collection; returns {"datasets": [...], "ground_truth": path, "counts": {...}}."""
    spec = spec or CollectionSpec()
    datasets = datasets or DEFAULT_DATASETS
    rng = np.random.default_rng(spec.seed)
    total_share = sum(share for _, share in datasets.values())
    plans: dict[str, Plan] = {}
    for name, (layout, share) in datasets.items():
        n = max(6, int(round(spec.images * share / total_share)))
        if layout in FIELD_LAYOUTS:
            n = max(3, n // 2)  # a field holds one to three cells
        plans[name] = PLANNERS[layout](name, np.random.default_rng(rng.integers(2**62)), n)

    gt: list[dict] = []
    jobs: dict[str, list] = {name: [(it, None) for it in plan.items] for name, plan in plans.items()}
    for name, plan in plans.items():
        for it in plan.items:
            gt.append(_gt_row(name, it.relpath, "original", it.cell_class, patient_id=it.patient_id,
                              patient_label=it.patient_label))
        for c in plan.crops:
            gt.append(_gt_row(name, c["relpath"], "crop", c["cell_class"], index=c["index"]))

    # Duplicates: exact (same pixels, lossless re-encode, same dataset) and near (transformed; within or
    # across datasets). Field datasets and multi-frame/EXIF oddities are not duplicated.
    single = [n for n, p in plans.items() if p.layout not in FIELD_LAYOUTS and p.path_for_label is not None]
    extra_index, num_near = 900000, 0
    cross_every = round(1 / spec.cross_dataset_share) if spec.cross_dataset_share > 0 else 0
    for name in single:
        plan = plans[name]
        candidates = [it for it in plan.items if it.mode in ("RGB", "RGBA")]
        n_near = int(round(len(candidates) * spec.near_duplicate_rate))
        n_exact = int(round(len(candidates) * spec.exact_duplicate_rate))
        picks = rng.choice(len(candidates), size=min(len(candidates), n_near + n_exact), replace=False)
        for j, idx in enumerate(picks):
            src = candidates[int(idx)]
            exact = j < n_exact
            target = name
            num_near += not exact
            # Every k-th near-duplicate goes to another dataset (deterministic, so small sets get some too).
            if not exact and cross_every and (num_near - 1) % cross_every == 0:
                options = [t for t in single if t != name and src.cell_class in plans[t].label_for_class]
                if options:
                    target = options[int(rng.integers(len(options)))]
            tplan = plans[target]
            label = src.source_label if target == name else tplan.label_for_class[src.cell_class]
            if label is None:
                continue
            extra_index += 1
            relpath = tplan.path_for_label(label, extra_index)
            if exact:  # lossless container of the same decoded pixels
                relpath = relpath.rsplit(".", 1)[0] + (".png" if not relpath.endswith(".png") else ".bmp")
            transform = "exact" if exact else str(rng.choice(NEAR_TRANSFORMS))
            tstyle = tplan.style
            extra = {"source": src, "source_layout": plan.layout, "target_layout": tplan.layout,
                     "transform": transform if not exact else "none", "seed": int(rng.integers(2**62)),
                     "kind": "exact_duplicate" if exact else "near_duplicate",
                     "quality": int(rng.integers(70, 86)) if transform == "reencode" else tstyle.jpeg_quality,
                     "target_width": tstyle.width if target != name else None}
            dup = Item(relpath, src.cell_class, 0, label, src.patient_id if target == name else None,
                       src.patient_label if target == name else None, mode="RGB",
                       fmt=_fmt_of(relpath))
            jobs[target].append((dup, extra))
            gt.append(_gt_row(target, relpath, extra["kind"], src.cell_class,
                              duplicate_of=f"{name}/{src.relpath}", transform=transform,
                              patient_id=dup.patient_id, patient_label=dup.patient_label))
            if tplan.layout == "table":
                tplan.metadata["labels.csv"] += f"{relpath},{label},{dup.patient_id or ''}\n".encode()

    # Bad files, in each dataset's image folders and with its extensions.
    for name, plan in plans.items():
        some = plan.items[0].relpath if plan.items else next(k for k in plan.metadata if not k.endswith((".csv", ".xml")))
        folder, ext = os.path.dirname(some), some.rsplit(".", 1)[-1]
        if plan.layout == "segpc":
            folder = "train/x"
        for k in range(spec.bad_files_per_dataset):
            kind = BAD_KINDS[k % len(BAD_KINDS)]
            e = "png" if kind == "too_large" else ext
            relpath = f"{folder}/corrupt_{kind}_{k}.{e}"
            plan.metadata[relpath] = _bad_file(kind, EXT_FMT[e.lower()], rng)
            gt.append(_gt_row(name, relpath, "bad", expected_reason=kind))
            if plan.layout == "table":
                plan.metadata["labels.csv"] += f"{relpath},neutrophil,\n".encode()

    # Write: metadata and field images inline, single-cell images in parallel chunks.
    for name, plan in plans.items():
        root = os.path.join(out_dir, name)
        for relpath, data in plan.metadata.items():
            _write(root, relpath, data)
    tasks = []
    for name, items in jobs.items():
        root = os.path.join(out_dir, name)
        for i in range(0, len(items), 64):
            tasks.append((root, plans[name].layout, items[i : i + 64]))
    workers = spec.workers or (os.cpu_count() or 1)
    if workers > 1 and len(tasks) > 2:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_render_and_write, tasks))
    else:
        for t in tasks:
            _render_and_write(t)

    table = pa.Table.from_pylist(gt)
    gt_path = os.path.join(out_dir, "ground_truth.parquet")
    pq.write_table(table, gt_path)
    ds_list = [{"name": name, "layout": plan.layout, "uri": os.path.join(os.path.abspath(out_dir), name),
                "modality": plan.style.modality} for name, plan in plans.items()]
    with open(os.path.join(out_dir, "datasets.yaml"), "w") as fh:
        yaml.safe_dump({"datasets": ds_list}, fh, sort_keys=False)
    counts = {str(k): int(v) for k, v in zip(*np.unique([r["kind"] for r in gt], return_counts=True))}
    return {"datasets": ds_list, "ground_truth": gt_path, "counts": counts}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--images", type=int, default=CollectionSpec.images)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args(argv)
    res = generate_collection(args.out_dir, CollectionSpec(images=args.images, seed=args.seed, workers=args.workers))
    print(f"wrote {sum(res['counts'].values())} ground-truth rows {res['counts']} to {args.out_dir}")


if __name__ == "__main__":
    main()
