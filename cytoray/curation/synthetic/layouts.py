"""Published layouts of public smear datasets, as plans of files to write (see ``collection.py``).

Each ``plan_<layout>`` returns :class:`Item` rows (one image file each, rendered from its own seed so a
duplicate can re-render its original) plus metadata files (label tables, annotations). The folder names,
file names, formats and pixel sizes follow the published datasets; the adapters in
``cytoray.curation.adapters`` cite the sources.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cytoray.curation.synthetic.cells import Stain, render_cell, render_field


@dataclass
class SourceStyle:
    """Per-source acquisition: the batch effect."""

    width: int
    height: int
    um_per_px: float
    fmt: str  # jpg | tiff | bmp | png
    stain: Stain
    jpeg_quality: int = 92
    modality: str = "peripheral_blood"


@dataclass
class Item:
    relpath: str
    cell_class: str  # rendered class (ground truth)
    seed: int
    source_label: str | None
    patient_id: str | None = None
    patient_label: str | None = None
    mode: str = "RGB"  # RGB | RGBA | L | P | CMYK | I;16 | multipage | exif
    fmt: str | None = None  # overrides the style's format
    index: int = 0  # running number within its source label


@dataclass
class Plan:
    name: str
    layout: str
    style: SourceStyle
    items: list[Item] = field(default_factory=list)
    metadata: dict[str, bytes] = field(default_factory=dict)  # relpath -> bytes
    crops: list[dict] = field(default_factory=list)  # ground truth of cells in detection/seg sets
    # rendered class -> a source label of this layout, for cross-dataset duplicates
    label_for_class: dict[str, str] = field(default_factory=dict)
    path_for_label: object = None  # callable(label, index) -> relpath


STYLES = {
    "acevedo": SourceStyle(360, 363, 0.10, "jpg", Stain(1.0, 1.0, 1.0, 0.00), 95),
    "matek": SourceStyle(400, 400, 0.08, "tiff", Stain(1.15, 0.85, 1.1, 0.06)),
    "bmc": SourceStyle(250, 250, 0.10, "jpg", Stain(0.9, 1.15, 0.9, -0.05), 85, "bone_marrow"),
    "raabin": SourceStyle(575, 575, 0.07, "jpg", Stain(1.05, 0.9, 1.2, 0.10), 90),
    "lisc": SourceStyle(720, 576, 0.09, "bmp", Stain(0.85, 1.2, 0.8, -0.10)),
    "aml_hehr": SourceStyle(144, 144, 0.17, "tiff", Stain(1.1, 1.05, 1.0, 0.03)),
    "apl_aml": SourceStyle(360, 363, 0.10, "jpg", Stain(0.95, 0.95, 1.05, 0.04), 88),
    "bccd": SourceStyle(640, 480, 0.30, "jpg", Stain(1.2, 1.1, 0.9, -0.03), 90),
    "segpc": SourceStyle(640, 480, 0.25, "bmp", Stain(1.0, 0.8, 1.25, 0.12), modality="bone_marrow"),
    "class_folders": SourceStyle(128, 128, 0.15, "png", Stain(0.95, 1.0, 0.95, 0.02)),
    "table": SourceStyle(96, 96, 0.2, "png", Stain(1.05, 0.95, 1.0, -0.02)),
}


def _pick(rng, weights: dict) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys], float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def render_item(item: Item, style: SourceStyle) -> np.ndarray:
    """The item's pixels (uint8 H×W×3) at the source's size — deterministic from ``item.seed``."""
    rng = np.random.default_rng(item.seed)
    canvas = min(128, max(style.width, style.height))
    um = style.um_per_px * max(style.width, style.height) / canvas
    img = render_cell(item.cell_class, canvas, um, style.stain, rng)
    if (style.width, style.height) != (canvas, canvas):
        img = np.asarray(Image.fromarray(img).resize((style.width, style.height), Image.BICUBIC))
    return img


def encode(img: np.ndarray, fmt: str, quality: int = 92, mode: str = "RGB") -> bytes:
    """Encode pixels the way a source stores them (format, bit depth, colour mode, EXIF, pages)."""
    pil = Image.fromarray(img)
    buf = io.BytesIO()
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "tiff": "TIFF", "bmp": "BMP", "png": "PNG"}[fmt]
    if mode == "RGBA":
        pil = pil.convert("RGBA")
    elif mode == "L":
        pil = pil.convert("L")
    elif mode == "P":
        pil = pil.convert("P", palette=Image.ADAPTIVE, colors=64)
    elif mode == "CMYK":
        pil = pil.convert("CMYK")
        fmt = "JPEG"
    elif mode == "I;16":  # 16-bit grayscale, as scientific cameras write
        pil = Image.fromarray(np.asarray(pil.convert("L")).astype(np.uint16) * 257)
        fmt = "TIFF"
    elif mode == "exif":  # stored rotated, with EXIF Orientation=6 (rotate 90° CW to display)
        pil = pil.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6
        pil.save(buf, "JPEG", quality=quality, exif=exif.tobytes())
        return buf.getvalue()
    elif mode == "multipage":
        pil.save(buf, "TIFF", save_all=True, append_images=[pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
        return buf.getvalue()
    kwargs = {"quality": quality} if fmt == "JPEG" else {}
    pil.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _single_cell_plan(name, layout, rng, n, labels: dict[str, tuple[str, float]], path_for, **item_kw) -> Plan:
    """Plan for layouts with one image per file: ``labels`` maps source label -> (rendered class, weight)."""
    plan = Plan(name, layout, STYLES[layout])
    weights = {lab: w for lab, (_, w) in labels.items()}
    counters: dict[str, int] = {}
    for _ in range(n):
        lab = _pick(rng, weights)
        counters[lab] = counters.get(lab, 0) + 1
        plan.items.append(Item(path_for(lab, counters[lab]), labels[lab][0], int(rng.integers(2**62)), lab,
                               index=counters[lab], **item_kw))
    for lab, (cls, _) in labels.items():
        plan.label_for_class.setdefault(cls, lab)
    plan.path_for_label = path_for
    return plan


def plan_acevedo(name, rng, n):
    """PBC_dataset_normal_DIB/<class>/<PREFIX>_<n>.jpg; IG and neutrophil sub-types in the prefix."""
    sub = {"SNE": ("neutrophil", "neutrophil_segmented", 3), "BNE": ("neutrophil", "neutrophil_band", 1),
           "MY": ("ig", "myelocyte", 1), "PMY": ("ig", "promyelocyte", 0.7), "MMY": ("ig", "metamyelocyte", 1),
           "BA": ("basophil", "basophil", 1.2), "EO": ("eosinophil", "eosinophil", 3),
           "ERB": ("erythroblast", "erythroblast", 1.5), "LY": ("lymphocyte", "lymphocyte", 1.2),
           "MO": ("monocyte", "monocyte", 1.4), "PLATELET": ("platelet", "platelet", 2.3)}
    return _single_cell_plan(
        name, "acevedo", rng, n, {p: (c, w) for p, (_, c, w) in sub.items()},
        lambda p, i: f"PBC_dataset_normal_DIB/{sub[p][0]}/{p}_{100000 + i}.jpg")


MATEK = {"BAS": ("basophil", 0.5), "EBO": ("erythroblast", 0.5), "EOS": ("eosinophil", 2),
         "KSC": ("smudge_cell", 0.5), "LYA": ("lymphocyte", 0.3), "LYT": ("lymphocyte", 20),
         "MMZ": ("metamyelocyte", 0.3), "MOB": ("blast", 0.3), "MON": ("monocyte", 8), "MYB": ("myelocyte", 0.5),
         "MYO": ("blast", 18), "NGB": ("neutrophil_band", 1.5), "NGS": ("neutrophil_segmented", 48),
         "PMB": ("promyelocyte", 0.3), "PMO": ("promyelocyte", 0.5)}


def plan_matek(name, rng, n):
    """AML-Cytomorphology_LMU/<CODE>/<CODE>_<NNNN>.tiff, 400×400 (some stored RGBA, as TIFF exports are)."""
    plan = _single_cell_plan(name, "matek", rng, n, MATEK,
                             lambda c, i: f"AML-Cytomorphology_LMU/{c}/{c}_{i:04d}.tiff")
    for it in plan.items[::7]:
        it.mode = "RGBA"
    return plan


BMC = {"ART": ("smudge_cell", 3), "BAS": ("basophil", 0.5), "BLA": ("blast", 10), "EBO": ("erythroblast", 20),
       "EOS": ("eosinophil", 4), "KSC": ("smudge_cell", 0.3), "LYT": ("lymphocyte", 20),
       "MMZ": ("metamyelocyte", 2), "MON": ("monocyte", 3), "MYB": ("myelocyte", 4),
       "NGB": ("neutrophil_band", 7), "NGS": ("neutrophil_segmented", 23), "PLM": ("plasma_cell", 5),
       "PMO": ("promyelocyte", 6)}


def plan_bmc(name, rng, n):
    """BM_cytomorphology_data/<CODE>/<0001-1000>/<CODE>_<NNNNN>.jpg, 250×250 JPEG."""
    def path(c, i):
        lo = (i - 1) // 1000 * 1000 + 1
        return f"BM_cytomorphology_data/{c}/{lo:04d}-{lo + 999:04d}/{c}_{i:05d}.jpg"
    return _single_cell_plan(name, "bmc", rng, n, BMC, path)


def plan_raabin(name, rng, n):
    """<Train|TestA>/<Class>/<id>.jpg, 575×575."""
    labels = {"Basophil": ("basophil", 1), "Eosinophil": ("eosinophil", 4), "Lymphocyte": ("lymphocyte", 25),
              "Monocyte": ("monocyte", 7), "Neutrophil": ("neutrophil_segmented", 63)}
    split = {}

    def path(lab, i):
        s = split.setdefault((lab, i), "Train" if rng.random() < 0.75 else "TestA")
        return f"{s}/{lab}/{95000 + i}_{lab[:2].lower()}.jpg"
    return _single_cell_plan(name, "raabin", rng, n, labels, path)


def plan_lisc(name, rng, n):
    """LISC Database/Main Dataset/<Baso|eosi|lymp|mono|neut|mixt>/<n>.bmp, 720×576 (spaces in the path)."""
    labels = {"Baso": ("basophil", 1), "eosi": ("eosinophil", 1), "lymp": ("lymphocyte", 1),
              "mono": ("monocyte", 1), "neut": ("neutrophil_segmented", 1), "mixt": ("lymphocyte", 0.3)}
    return _single_cell_plan(name, "lisc", rng, n, labels, lambda c, i: f"LISC Database/Main Dataset/{c}/{i}.bmp")


# AML subtypes of Hehr et al. 2023 and the cell mix a patient of each shows (blasts, promyelocytes...).
HEHR_SUBTYPES = {
    "CBFB_MYH11": {"blast": 4, "monocyte": 4, "eosinophil": 3, "neutrophil_segmented": 3, "lymphocyte": 3},
    "NPM1": {"blast": 8, "monocyte": 3, "neutrophil_segmented": 3, "lymphocyte": 3},
    "PML_RARA": {"promyelocyte": 9, "blast": 2, "neutrophil_segmented": 2, "lymphocyte": 3},
    "RUNX1_RUNX1T1": {"blast": 5, "myelocyte": 4, "neutrophil_segmented": 4, "lymphocyte": 3},
    "SCD": {"neutrophil_segmented": 8, "lymphocyte": 5, "monocyte": 2, "eosinophil": 1},
}


def _patient_ids(rng, n):
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    ids = set()
    while len(ids) < n:
        ids.add("".join(rng.choice(letters, 3)))
    return sorted(ids)


def plan_aml_hehr(name, rng, n):
    """data/<subtype>/<patient>/image_<k>.tif (144×144) + metadata.csv (patient_id, diagnose, ...)."""
    plan = Plan(name, "aml_hehr", STYLES["aml_hehr"])
    n_pat = max(len(HEHR_SUBTYPES) * 2, n // 25)
    pats = _patient_ids(rng, n_pat)
    subtypes = list(HEHR_SUBTYPES)
    rows = ["patient_id,diagnose,sex,age"]
    per = np.full(n_pat, n // n_pat)
    per[: n - per.sum()] += 1
    for p_i, (pid, k) in enumerate(zip(pats, per)):
        sub = subtypes[p_i % len(subtypes)]
        rows.append(f"{pid},{sub},{'mf'[p_i % 2]},{int(rng.integers(20, 85))}")
        for j in range(int(k)):
            plan.items.append(Item(f"data/{sub}/{pid}/image_{j}.tif", _pick(rng, HEHR_SUBTYPES[sub]),
                                   int(rng.integers(2**62)), None, pid, sub))
    plan.metadata["metadata.csv"] = ("\n".join(rows) + "\n").encode()
    return plan


APL_CELLS = {"Neutrophil": "neutrophil_segmented", "Lymphocyte": "lymphocyte", "Monocyte": "monocyte",
             "Blast": "blast", "Promyelocyte": "promyelocyte", "Eosinophil": "eosinophil", "Band": "neutrophil_band"}


def plan_apl_aml(name, rng, n):
    """master.csv (Patient_ID, Diagnosis) + Data/<Patient_ID>/Signed slides/<cell label>/<n>.jpg."""
    plan = Plan(name, "apl_aml", STYLES["apl_aml"])
    n_pat = max(4, n // 20)
    rows = ["Patient_ID,Diagnosis,Age,Gender"]
    mix = {"APL": {"Promyelocyte": 8, "Blast": 2, "Neutrophil": 2, "Lymphocyte": 2},
           "AML": {"Blast": 8, "Monocyte": 2, "Neutrophil": 3, "Lymphocyte": 2, "Band": 1}}
    for p_i, pid in enumerate(f"Patient_{i:02d}" for i in range(n_pat)):
        dx = "APL" if p_i % 2 == 0 else "AML"
        rows.append(f"{pid},{dx},{int(rng.integers(20, 85))},{'MF'[p_i % 2]}")
        for j in range(n // n_pat + (p_i < n % n_pat)):
            lab = _pick(rng, mix[dx])
            plan.items.append(Item(f"Data/{pid}/Signed slides/{lab}/{j}.jpg", APL_CELLS[lab],
                                   int(rng.integers(2**62)), lab, pid, dx))
    plan.metadata["master.csv"] = ("\n".join(rows) + "\n").encode()
    return plan


def _field_cells(rng, style, classes, k):
    cells = []
    margin = 30
    for _ in range(k):
        cells.append((_pick(rng, classes), float(rng.uniform(margin, style.height - margin)),
                      float(rng.uniform(margin, style.width - margin))))
    return cells


def plan_bccd(name, rng, n_fields):
    """BCCD (Pascal VOC): BCCD/JPEGImages/BloodImage_NNNNN.jpg + BCCD/Annotations/*.xml + labels.csv."""
    plan = Plan(name, "bccd", STYLES["bccd"])
    style = plan.style
    labels_csv = [",Image,Category"]
    classes = {"neutrophil_segmented": 6, "lymphocyte": 2, "monocyte": 1, "eosinophil": 2}
    cat = {"neutrophil_segmented": "NEUTROPHIL", "lymphocyte": "LYMPHOCYTE", "monocyte": "MONOCYTE",
           "eosinophil": "EOSINOPHIL"}
    for i in range(n_fields):
        stem = f"BloodImage_{i:05d}"
        cls = _pick(rng, classes)
        cells = [(cls, *pos[1:]) for pos in _field_cells(rng, style, classes, 1 + int(rng.random() < 0.2))]
        seed = int(rng.integers(2**62))
        field_rng = np.random.default_rng(seed)
        img = render_field(style.width, style.height, style.um_per_px, style.stain, field_rng, cells)
        objs = []
        for k, (c, cy, cx) in enumerate(cells):
            r = 14.0 / style.um_per_px / 2 * 1.1
            box = [max(0, int(cx - r)), max(0, int(cy - r)), min(style.width, int(cx + r)), min(style.height, int(cy + r))]
            objs.append(("WBC", box))
            plan.crops.append({"relpath": f"BCCD/JPEGImages/{stem}.jpg", "index": k, "cell_class": c})
        for _ in range(3):  # red cells and platelets are annotated too, and must be ignored
            y, x = rng.uniform(10, style.height - 30), rng.uniform(10, style.width - 30)
            objs.append(("RBC", [int(x), int(y), int(x + 25), int(y + 25)]))
        xml = [f"<annotation><folder>JPEGImages</folder><filename>{stem}.jpg</filename>",
               f"<size><width>{style.width}</width><height>{style.height}</height><depth>3</depth></size>"]
        for oname, (x0, y0, x1, y1) in objs:
            xml.append(f"<object><name>{oname}</name><pose>Unspecified</pose><truncated>0</truncated>"
                       f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                       f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
        xml.append("</annotation>")
        plan.metadata[f"BCCD/Annotations/{stem}.xml"] = "\n".join(xml).encode()
        plan.metadata[f"BCCD/JPEGImages/{stem}.jpg"] = encode(img, "jpg", style.jpeg_quality)
        labels_csv.append(f"{i},{i},{cat[cls]}")
    plan.metadata["labels.csv"] = ("\n".join(labels_csv) + "\n").encode()
    return plan


def plan_segpc(name, rng, n_fields):
    """SegPC-2021: train/x/<id>.bmp fields + train/y/<id>_<k>.bmp one instance mask per cell
    (pixel value 20 = cytoplasm, 40 = nucleus)."""
    plan = Plan(name, "segpc", STYLES["segpc"])
    style = plan.style
    for i in range(n_fields):
        stem = f"{100 + i}"
        cells = _field_cells(rng, style, {"plasma_cell": 1}, int(rng.integers(1, 4)))
        seed = int(rng.integers(2**62))
        img = render_field(style.width, style.height, style.um_per_px, style.stain, np.random.default_rng(seed), cells)
        plan.metadata[f"train/x/{stem}.bmp"] = encode(img, "bmp")
        yy, xx = np.mgrid[0 : style.height, 0 : style.width]
        for k, (c, cy, cx) in enumerate(cells):
            r = 12.0 / 2 / style.um_per_px
            mask = np.zeros((style.height, style.width), np.uint8)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 20
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= (0.5 * r) ** 2] = 40
            plan.metadata[f"train/y/{stem}_{k + 1}.bmp"] = encode(mask, "bmp", mode="L")
            plan.crops.append({"relpath": f"train/x/{stem}.bmp", "index": k, "cell_class": c})
    return plan



def plan_class_folders(name, rng, n):
    """A private set as users keep one: <Label>/<file> in whatever formats and colour modes they have."""
    labels = {"Neutrophil": ("neutrophil_segmented", 3), "Lymphocyte": ("lymphocyte", 2),
              "Monocyte": ("monocyte", 1), "Blast cells": ("blast", 1)}
    modes = [("RGB", "png"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "jpg"),
             ("I;16", "tiff"), ("multipage", "tiff"), ("exif", "jpg"), ("RGB", "bmp"), ("RGB", "jpg")]
    names = ["zelle größe {i}", "cell {i}", "细胞_{i}", "cell-{i}"]

    def path(lab, i):
        mode, fmt = modes[i % len(modes)]
        return f"{lab}/{names[i % len(names)].format(i=i)}.{'tif' if fmt == 'tiff' else fmt}"
    plan = _single_cell_plan(name, "class_folders", rng, n, labels, path)
    for g, it in enumerate(plan.items):  # cycle modes over the whole set so even tiny sets hold every kind
        it.index, it.relpath = g, path(it.source_label, g)
        it.mode, it.fmt = modes[g % len(modes)]
    return plan


def plan_table(name, rng, n):
    """A CSV of uri + labels: labels.csv (uri,label,patient_id) next to images/<n>.png."""
    labels = {"neutrophil": ("neutrophil_segmented", 2), "lymphocyte": ("lymphocyte", 2),
              "eosinophil": ("eosinophil", 1), "plasma cell": ("plasma_cell", 1)}
    plan = _single_cell_plan(name, "table", rng, n, labels, lambda lab, i: f"images/{lab.replace(' ', '_')}_{i}.png")
    rows = ["uri,label,patient_id"]
    for it in plan.items:
        it.patient_id = f"P{int(it.seed % 5)}"
        rows.append(f"{it.relpath},{it.source_label},{it.patient_id}")
    plan.metadata["labels.csv"] = ("\n".join(rows) + "\n").encode()
    return plan


PLANNERS = {
    "acevedo": plan_acevedo, "matek": plan_matek, "bmc": plan_bmc, "raabin": plan_raabin, "lisc": plan_lisc,
    "aml_hehr": plan_aml_hehr, "apl_aml": plan_apl_aml, "bccd": plan_bccd, "segpc": plan_segpc,
    "class_folders": plan_class_folders, "table": plan_table,
}
