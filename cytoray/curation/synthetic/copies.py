"""What re-exports do to a picture, with parameters drawn from realistic ranges, and distinct cells that look alike.

A planted **copy** is the same picture after what publishing it again does: re-encoding, another bounding box (a
crop off one or two sides, or a box moved over the smear field), rescaling, flips and quarter turns, blur, colour,
gamma and stain shifts, and pairs of these. Each kind draws its parameters (``COPY_KINDS``; ranges below) and
returns a description of what it did, which the ground truth keeps.

A planted **look-alike** is a distinct cell that a similarity threshold confuses with a copy: ``twin`` renders
another cell of the same class with the same stain, size and position (only the chromatin, granules, nucleus
details and red cells around it differ), weighted towards the featureless classes where that is hardest
(basophils, small lymphocytes, erythroblasts); ``overlap`` is another crop of the same smear field, shifted by
25-40% of the image, so the two share part of their pixels but show different cells. Neither is a duplicate.

Pictures come from a field (``render_field_and_box``): the cell rendered on a canvas a quarter larger than the
image, the image being the centred box, so that a copy can be cut with a box that reaches beyond the original's.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

COPY_KINDS = ("exact", "reencode", "flip", "rot90", "crop_one_side", "crop_two_sides", "rebox", "downscale",
              "upscale", "blur", "colour", "stain", "combo")
LOOKALIKE_KINDS = ("twin", "overlap")
FEATURELESS = ("basophil", "lymphocyte", "erythroblast")  # classes whose cells differ least (twin draws)
FIELD_MARGIN = 0.125  # field = image side x (1 + 2 margin): room for boxes moved outwards
# what one kind of a pair ("combo") can be; geometry first, then resampling, colour, blur, orientation, encoding
_COMBO_ORDER = ("crop_one_side", "crop_two_sides", "rebox", "downscale", "upscale", "colour", "stain", "blur",
                "flip", "rot90", "reencode")
_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "area": Image.BOX, "lanczos": Image.LANCZOS}
_SIDES = ("left", "right", "top", "bottom")


def field_size(side: int) -> int:
    return side + 2 * int(round(side * FIELD_MARGIN))


def image_box(side: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the picture in its field."""
    m = int(round(side * FIELD_MARGIN))
    return m, m, m + side, m + side


def render_field_and_box(cell_class: str, side: int, um_per_px: float, stain, rng: np.random.Generator,
                         geometry: tuple[float, float, float] | None = None) -> np.ndarray:
    """The cell's field: ``field_size(side)`` square, the white cell at the centre (``cells.render_cell``);
    the picture is ``field[image_box]``. ``geometry`` (size factor, centre offset y, x in px) fixes the cell."""
    from cytoray.curation.synthetic.cells import render_cell

    f = field_size(side)
    geo = None if geometry is None else (geometry[0], f / 2 + geometry[1], f / 2 + geometry[2])
    return render_cell(cell_class, f, um_per_px, stain, rng, geometry=geo)


def draw_geometry(side: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """A cell's (size factor, centre offset y, x in px), as ``render_cell`` draws them."""
    dy, dx = rng.normal(0, side * 0.03, 2)
    return float(rng.uniform(0.9, 1.1)), float(dy), float(dx)


def crop(field: np.ndarray, box) -> np.ndarray:
    left, top, right, bottom = box
    return np.ascontiguousarray(field[top:bottom, left:right])


def _resize(img: np.ndarray, w: int, h: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    name = str(rng.choice(list(_FILTERS)))
    return np.asarray(Image.fromarray(img).resize((max(1, w), max(1, h)), _FILTERS[name])), name


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _apply(kind: str, img: np.ndarray, field: np.ndarray, box, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One transform of the picture ``img`` (= ``field[box]`` until geometry changed it)."""
    h, w = img.shape[:2]
    if kind == "exact":
        return img, "exact"
    if kind == "reencode":
        q = int(rng.integers(50, 96))
        return _jpeg(img, q), f"jpeg q{q}"
    if kind == "flip":
        if rng.random() < 0.5:
            return np.ascontiguousarray(img[:, ::-1]), "flip horizontal"
        return np.ascontiguousarray(img[::-1]), "flip vertical"
    if kind == "rot90":
        k = int(rng.integers(1, 4))
        return np.ascontiguousarray(np.rot90(img, k)), f"rotate {90 * k}"
    if kind in ("crop_one_side", "crop_two_sides"):
        sides = [str(s) for s in rng.choice(_SIDES, 1 if kind == "crop_one_side" else 2, replace=False)]
        cut = {s: float(rng.uniform(0.03 if kind == "crop_one_side" else 0.02, 0.10)) for s in sides}
        left, top = int(round(w * cut.get("left", 0))), int(round(h * cut.get("top", 0)))
        right, bottom = w - int(round(w * cut.get("right", 0))), h - int(round(h * cut.get("bottom", 0)))
        out = np.ascontiguousarray(img[top:bottom, left:right])
        what = "crop " + ", ".join(f"{cut[s]:.2f} {s}" for s in sides)
        if rng.random() < 0.5:
            out, filt = _resize(out, w, h, rng)
            what += f", resized back ({filt})"
        return out, what
    if kind == "rebox":  # the same cell boxed again over the field: each edge moved by up to 10% of the side
        left, top, right, bottom = box
        bw, bh = right - left, bottom - top
        move = rng.uniform(-0.10, 0.10, 4)
        new = (left + int(round(move[0] * bw)), top + int(round(move[1] * bh)),
               right + int(round(move[2] * bw)), bottom + int(round(move[3] * bh)))
        new = (max(0, new[0]), max(0, new[1]), min(field.shape[1], new[2]), min(field.shape[0], new[3]))
        out = crop(field, new)
        what = "rebox " + ", ".join(f"{m:+.2f}" for m in move)
        if rng.random() < 0.5:
            out, filt = _resize(out, w, h, rng)
            what += f", resized to the original size ({filt})"
        return out, what
    if kind in ("downscale", "upscale"):
        s = float(rng.uniform(0.5, 0.9) if kind == "downscale" else rng.uniform(1.1, 1.5))
        out, filt = _resize(img, int(round(w * s)), int(round(h * s)), rng)
        return out, f"scale {s:.2f} ({filt})"
    if kind == "blur":
        sigma = float(rng.uniform(0.5, 1.2))
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(sigma))), f"blur sigma {sigma:.2f}"
    if kind == "colour":
        gain, gamma, channel = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.25), rng.uniform(0.92, 1.08, 3)
        x = np.clip((img.astype(np.float32) / 255.0) ** gamma * gain * channel, 0, 1)
        return (x * 255 + 0.5).astype(np.uint8), f"brightness {gain:.2f}, gamma {gamma:.2f}"
    if kind == "stain":  # stain normalisation / another scanner: optical densities mixed and scaled
        od = -np.log((img.astype(np.float32) + 1) / 256)
        mix = np.eye(3) + rng.uniform(-0.12, 0.12, (3, 3))
        scale = rng.uniform(0.85, 1.15)
        out = 256 * np.exp(-(od @ mix.T.astype(np.float32)) * scale) - 1
        return np.clip(out + 0.5, 0, 255).astype(np.uint8), f"stain mix, density {scale:.2f}"
    raise ValueError(f"unknown copy kind {kind!r}; choose one of {COPY_KINDS}")


def make_copy(field: np.ndarray, box, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(pixels, what was done) of a copy of ``field[box]``; ``combo``: two different kinds in publishing order."""
    img = crop(field, box)
    if kind != "combo":
        return _apply(kind, img, field, box, rng)
    a, b = sorted(rng.choice(len(_COMBO_ORDER), 2, replace=False))
    geometric = ("crop_one_side", "crop_two_sides", "rebox")
    if _COMBO_ORDER[a] in geometric and _COMBO_ORDER[b] in geometric:  # one new box is enough
        b = int(rng.integers(len(geometric), len(_COMBO_ORDER)))
    parts = []
    for kind_ in (_COMBO_ORDER[a], _COMBO_ORDER[b]):
        img, what = _apply(kind_, img, field, box, rng)
        parts.append(what)
    return np.ascontiguousarray(img), "; ".join(parts)


def twin_class(cell_class: str, rng: np.random.Generator, featureless_share: float = 0.6) -> str:
    """The class a look-alike twin is drawn for: a featureless class with probability ``featureless_share``, else
    the given one."""
    return str(rng.choice(FEATURELESS)) if rng.random() < featureless_share else cell_class


def overlap_canvas_size(side: int) -> int:
    """Side of the canvas an ``overlap`` look-alike's new pixels come from (``make_overlap``)."""
    return field_size(side) + 2 * side


def make_overlap(field: np.ndarray, box, canvas: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Another crop of the same smear, shifted by 25-40% of the side: it shares part of ``field[box]``'s pixels and
    shows another region where it leaves the field — taken from ``canvas`` (another rendering, with the same stain,
    of size ``overlap_canvas_size``), into whose centre the field is pasted."""
    left, top, right, bottom = box
    side = right - left
    shift = float(rng.uniform(0.25, 0.40))
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = int(round(shift * side * np.sin(angle))), int(round(shift * side * np.cos(angle)))
    big = canvas.copy()
    big[side:side + field.shape[0], side:side + field.shape[1]] = field
    out = big[top + dy + side:bottom + dy + side, left + dx + side:right + dx + side]
    return np.ascontiguousarray(out), f"overlapping crop shifted {shift:.2f}"
