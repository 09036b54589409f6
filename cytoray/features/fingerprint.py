"""Copy-detection fingerprints of one image, computed once at embed time (``curation.dedup`` reads them).

Two steps use them (docs/curation.md, "Duplicates"):

- **Candidate views** ``views`` (2, 32, 32) uint8: band-passed grey windows. ``canonical`` is anchored on the
  image's content, so that another bounding box, rescaling or a stretched re-export of the same picture gives the
  same window: centred on the dark mass (the cell's nucleus and granules) and sized by its spread (3 standard
  deviations per axis, in pixels of the image, not of its frame: a window sized from the frame changes with every
  crop); ``frame`` is the whole image, squashed (for a cell that fills its box, where the dark mass reaches the
  border and moves with a crop). Each window is sampled at 32 × 32 after an anti-alias blur and band-passed
  (difference of Gaussians, 0.6 / 1.6 px), which removes illumination and colour shifts and keeps the structure
  that tells cells apart. The search compares each view with the same view of the other images under the 8 flips
  and quarter turns.
- **Verification thumbnail** ``verify`` (96, 96) uint8: the whole image in grey, squashed to a square (so a crop
  resized back and one left at its size map alike), on which ``curation.verification`` finds the transform
  between two images and scores the aligned pixels.

``frames`` (2, 4) float32 are the views' windows (centre x, y and half-sizes as fractions of the image width and
height): the verifier starts its search from them; ``size`` (height, width) tells it the image's resolution.
11,304 bytes per image in all (views 2,048, verify 9,216, frames 32, size 8).

Measured on planted copies and look-alikes (benchmarks/RESULTS.md, "Candidate views"): among 29,914 images with
5,000 planted copies (``benchmarks/candidate_views.py``), the true source is the nearest image of one of the two
views for 99.5% of copies (copies cropped on two sides 97.2%), with 1.35 candidate pairs per image at view cosine
0.75; the earlier windows sized from the image's frame (a canonical window of at least half the image and a centred
one of 84%, plus the frame) found 98.6% (crops on two sides 90.3%) with 1.87 pairs per image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

VIEWS = ("canonical", "frame")
VIEW_SIZE = 32
VERIFY_SIZE = 96
VIEW_BAND = (0.6, 1.6)  # difference-of-Gaussians sigmas of the views, in view pixels
DARK_LEVEL = 0.8  # dark mass: pixels darker than this share of the way from the background level to the darkest
CANONICAL_SPREAD = 3.0  # canonical view: half-size in standard deviations of the dark mass per axis ...
# ... and at least this fraction of the image per axis (a dot of a nucleus). A floor of 0.25 tied the window of
# small dark masses to the frame, so a crop rescaled it: at 3 sd, 87% of the cropped copies at 0.25, 98.6% at 0.04-0.08
CANONICAL_MIN_HALF = 0.06
WORK_SIDE = 256  # larger images are box-reduced to at most this side before the views are taken
FINGERPRINT_BYTES = len(VIEWS) * VIEW_SIZE**2 + VERIFY_SIZE**2 + len(VIEWS) * 4 * 4 + 2 * 4


def grey(rgb_u8: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb_u8).convert("L"), np.float32)


def dark_mass_frame(g: np.ndarray, level: float = DARK_LEVEL) -> tuple[float, float, float, float]:
    """(cx, cy, sx, sy) in pixels (pixel i covers [i, i + 1)) of the image's dark mass: each pixel weighted by how far
    its darkness lies above ``level`` of the way from the background level (10th percentile of darkness) to the
    darkest (99.5th), clipped to [0, 1] (at 0.8: the nucleus, not the cytoplasm or red cells, whose share of the
    image changes with a crop). Percentiles of the darkness follow brightness, gamma and stain changes and barely
    move when a box cuts off background; a blank image gives its centre and a quarter of its size."""
    d = 255.0 - g
    lo, hi = np.percentile(d, [10, 99.5])
    h, w = g.shape
    if hi - lo < 1.0:
        return w / 2, h / 2, w / 4, h / 4
    t = lo + level * (hi - lo)
    wgt = np.clip((d - t) / max(hi - t, 1e-3), 0.0, 1.0)
    total = float(wgt.sum())
    if total < 1e-6:
        return w / 2, h / 2, w / 4, h / 4
    ys, xs = np.arange(h, dtype=np.float64) + 0.5, np.arange(w, dtype=np.float64) + 0.5
    row, col = wgt.sum(1), wgt.sum(0)
    cy, cx = float(row @ ys / total), float(col @ xs / total)
    sy = float(np.sqrt(row @ (ys - cy) ** 2 / total))
    sx = float(np.sqrt(col @ (xs - cx) ** 2 / total))
    return cx, cy, max(sx, 0.5), max(sy, 0.5)


def view_frames(g: np.ndarray) -> np.ndarray:
    """(2, 4) windows of the views as fractions of the image: centre x, y, half-width, half-height."""
    h, w = g.shape
    cx, cy, sx, sy = dark_mass_frame(g)
    canonical = (cx / w, cy / h, max(CANONICAL_SPREAD * sx / w, CANONICAL_MIN_HALF),
                 max(CANONICAL_SPREAD * sy / h, CANONICAL_MIN_HALF))
    frame = (0.5, 0.5, 0.5, 0.5)
    return np.array([canonical, frame], np.float32)


def sample_window(g: np.ndarray, frame, size: int = VIEW_SIZE) -> np.ndarray:
    """The window ``frame`` (fractions: cx, cy, hx, hy) of ``g`` as size × size float32: anti-alias blur by the
    sampling step, bilinear samples at the cells' centres, edge pixels repeated outside the image."""
    from scipy import ndimage

    h, w = g.shape
    cx, cy, hx, hy = frame[0] * w, frame[1] * h, frame[2] * w, frame[3] * h
    step_x, step_y = 2 * hx / size, 2 * hy / size
    blur = (max(0.0, 0.5 * step_y - 0.3), max(0.0, 0.5 * step_x - 0.3))
    src = ndimage.gaussian_filter(g, blur, mode="nearest") if max(blur) > 0 else g
    xs = cx - hx + (np.arange(size) + 0.5) * step_x - 0.5  # pixel i's centre is at coordinate i
    ys = cy - hy + (np.arange(size) + 0.5) * step_y - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndimage.map_coordinates(src, [yy, xx], order=1, mode="nearest").astype(np.float32)


def band_pass(x: np.ndarray, sigmas: tuple[float, float]) -> np.ndarray:
    """Difference of Gaussians over the last two axes (edges repeated)."""
    from scipy import ndimage

    spec = (0,) * (x.ndim - 2)
    return (ndimage.gaussian_filter(x, spec + (sigmas[0],) * 2, mode="nearest")
            - ndimage.gaussian_filter(x, spec + (sigmas[1],) * 2, mode="nearest"))


def quantise(x: np.ndarray) -> np.ndarray:
    """Signed values -> uint8 around 128, scaled per leading index (the search normalises each row anyway)."""
    peak = np.abs(x).reshape(len(x), -1).max(1).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.clip(np.rint(128 + 127 * x / np.maximum(peak, 1e-6)), 0, 255).astype(np.uint8)


def _work_image(g: np.ndarray) -> np.ndarray:
    h, w = g.shape
    factor = max(h, w) / WORK_SIDE
    if factor <= 1:
        return g
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(g).resize(size, Image.BILINEAR), np.float32)  # antialiased, flip-symmetric


def fingerprint(rgb_u8: np.ndarray) -> dict[str, np.ndarray]:
    """views (2, 32, 32) uint8, frames (2, 4) float32, verify (96, 96) uint8 and size (height, width) int32 of one
    H×W×3 uint8 image."""
    g = grey(rgb_u8)
    work = _work_image(g)
    frames = view_frames(work)
    views = band_pass(np.stack([sample_window(work, f) for f in frames]), VIEW_BAND)
    # PIL's antialiased bilinear filter: a flipped image gives the flipped thumbnail exactly (its BOX filter does
    # not, by up to 17 grey levels at non-integer ratios)
    verify = np.asarray(Image.fromarray(rgb_u8).convert("L").resize((VERIFY_SIZE, VERIFY_SIZE), Image.BILINEAR))
    return {"views": quantise(views), "frames": frames, "verify": np.ascontiguousarray(verify, np.uint8),
            "size": np.array(rgb_u8.shape[:2], np.int32)}


def fingerprint_batch(images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The fingerprints of several images, stacked: views (N, 2, 32, 32), frames (N, 2, 4), verify (N, 96, 96),
    size (N, 2)."""
    parts = [fingerprint(im) for im in images]
    if not parts:
        return empty_fingerprints()
    return {k: np.stack([p[k] for p in parts]) for k in parts[0]}


def empty_fingerprints(n: int = 0) -> dict[str, np.ndarray]:
    return {"views": np.zeros((n, len(VIEWS), VIEW_SIZE, VIEW_SIZE), np.uint8),
            "frames": np.zeros((n, len(VIEWS), 4), np.float32),
            "verify": np.zeros((n, VERIFY_SIZE, VERIFY_SIZE), np.uint8), "size": np.zeros((n, 2), np.int32)}


# embeddings.parquet columns (FixedSizeList) of each fingerprint part; the views are the "fingerprint" column
FINGERPRINT_COLUMNS = {"views": "fingerprint", "frames": "frames", "verify": "verify", "size": "image_size"}


def fingerprint_columns(images: list[np.ndarray]) -> dict:
    """The embeddings table's fingerprint columns of some images (``FINGERPRINT_COLUMNS``)."""
    return fingerprint_table_columns(fingerprint_batch(images))


def fingerprint_table_columns(fp: dict[str, np.ndarray]) -> dict:
    from cytoray.tables import pack_vectors

    return {col: pack_vectors(fp[key].reshape(len(fp[key]), -1)) for key, col in FINGERPRINT_COLUMNS.items()}


def fingerprints_of_table(table) -> dict[str, np.ndarray]:
    """The fingerprint columns of a features table as arrays (what ``fingerprint_batch`` returns)."""
    from cytoray.tables import unpack_vectors

    n = table.num_rows
    missing = [c for c in FINGERPRINT_COLUMNS.values() if c not in table.column_names]
    if missing:
        raise ValueError(f"the features table has no {missing} column(s): it was written before copy-detection "
                         "fingerprints; rerun the embed stage (force=true)")
    shapes = {"views": (len(VIEWS), VIEW_SIZE, VIEW_SIZE), "frames": (len(VIEWS), 4),
              "verify": (VERIFY_SIZE, VERIFY_SIZE), "size": (2,)}
    dtypes = {"views": np.uint8, "frames": np.float32, "verify": np.uint8, "size": np.int32}
    out = {}
    for key, col in FINGERPRINT_COLUMNS.items():
        x = unpack_vectors(table.column(col), dtypes[key])
        if x.size != n * int(np.prod(shapes[key])):
            raise ValueError(f"the {col!r} column holds an older fingerprint layout; rerun the embed stage (force=true)")
        out[key] = x.reshape((n,) + shapes[key])
    return out
