"""Render single white-cell images with class-dependent morphology on a background of red cells.

An image is built in optical-density space from three stain channels — a nuclear (haematoxylin/azure,
purple), an acidophilic (eosin, pink/orange) and a basophilic-cytoplasm (methylene blue) stain — then
turned into RGB by Beer–Lambert, ``rgb = 255 * exp(-sum_s c_s * v_s)``. A per-source :class:`Stain`
rotates and scales the stain vectors, which is how real smear sources differ (the batch effect).

Morphology follows standard haematology atlases: segmented neutrophils have 3–5 connected lobes, bands a
C-shaped nucleus, lymphocytes a round nucleus with a thin blue rim, monocytes a large folded nucleus with
grey-blue vacuolated cytoplasm, eosinophils a bilobed nucleus under orange granules, basophils dark
granules over the nucleus, blasts a large fine-chromatin nucleus with nucleoli, erythroblasts a small dense
round nucleus, promyelocytes azurophilic granules, myelocytes/metamyelocytes an eccentric round/indented
nucleus in pink cytoplasm, plasma cells an eccentric nucleus, deep blue cytoplasm and a perinuclear halo,
smudge cells an irregular pale nuclear smear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Stain absorption vectors (optical density per unit concentration, R, G, B).
NUCLEAR = np.array([0.55, 0.95, 0.35])
EOSIN = np.array([0.05, 0.75, 0.40])
BLUE = np.array([0.80, 0.40, 0.10])


@dataclass(frozen=True)
class ClassSpec:
    cell_um: float  # cell diameter
    nucleus: str  # shape kind, see _nucleus_mask
    nucleus_frac: float  # nucleus size relative to the cell radius
    cyto: tuple[float, float, float]  # cytoplasm concentrations (nuclear, eosin, blue)
    granules: tuple[float, float, float] = (0.0, 0.0, 0.0)  # granule concentrations
    granule_density: float = 0.0
    nucleus_density: float = 1.0


CLASSES: dict[str, ClassSpec] = {
    "neutrophil_segmented": ClassSpec(12.0, "lobes", 0.55, (0.05, 0.28, 0.04), (0.25, 0.15, 0.0), 0.15),
    "neutrophil_band": ClassSpec(12.0, "band", 0.62, (0.05, 0.28, 0.04), (0.25, 0.15, 0.0), 0.15),
    "lymphocyte": ClassSpec(8.5, "round", 0.86, (0.02, 0.02, 0.45), nucleus_density=1.25),
    "monocyte": ClassSpec(16.0, "kidney", 0.62, (0.12, 0.08, 0.28), (-0.15, -0.1, -0.2), 0.06),
    "eosinophil": ClassSpec(13.0, "bilobed", 0.5, (0.02, 0.35, 0.02), (0.0, 1.0, 0.05), 0.55),
    "basophil": ClassSpec(11.0, "round", 0.55, (0.15, 0.10, 0.15), (1.4, 0.0, 0.4), 0.5, 0.8),
    "blast": ClassSpec(15.0, "nucleoli", 0.8, (0.03, 0.02, 0.42), nucleus_density=0.72),
    "erythroblast": ClassSpec(9.0, "round", 0.58, (0.05, 0.25, 0.35), nucleus_density=1.6),
    "promyelocyte": ClassSpec(18.0, "eccentric", 0.6, (0.05, 0.10, 0.35), (0.9, 0.3, 0.0), 0.35, 0.85),
    "myelocyte": ClassSpec(14.0, "eccentric", 0.55, (0.04, 0.30, 0.08), (0.3, 0.25, 0.0), 0.2, 1.0),
    "metamyelocyte": ClassSpec(12.5, "kidney", 0.52, (0.04, 0.30, 0.06), (0.25, 0.2, 0.0), 0.15),
    "plasma_cell": ClassSpec(12.0, "plasma", 0.5, (0.04, 0.05, 0.75), nucleus_density=1.2),
    "smudge_cell": ClassSpec(14.0, "smudge", 0.9, (0.0, 0.0, 0.0), nucleus_density=0.45),
    "platelet": ClassSpec(3.0, "platelet", 1.0, (0.2, 0.2, 0.1), (0.9, 0.2, 0.0), 0.4),
}
CLASS_NAMES = tuple(CLASSES)


@dataclass(frozen=True)
class Stain:
    """A source's staining: scales per stain and a shift of the stain colours (radians, in RG space)."""

    nuclear: float = 1.0
    eosin: float = 1.0
    blue: float = 1.0
    hue_shift: float = 0.0
    background_od: float = 0.04

    def vectors(self) -> np.ndarray:
        c, s = np.cos(self.hue_shift), np.sin(self.hue_shift)
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        vecs = np.stack([NUCLEAR * self.nuclear, EOSIN * self.eosin, BLUE * self.blue])
        return np.clip(vecs @ rot.T, 0.0, None)  # (3 stains, 3 channels)


def _blur(x: np.ndarray, passes: int = 1) -> np.ndarray:
    """Cheap separable box blur (edge-clamped) — used to soften masks and granule speckle."""
    for _ in range(passes):
        x = (np.roll(x, 1, 0) + x + np.roll(x, -1, 0)) / 3.0
        x = (np.roll(x, 1, 1) + x + np.roll(x, -1, 1)) / 3.0
    return x


def _disc(yy, xx, cy, cx, ry, rx=None, angle=0.0) -> np.ndarray:
    rx = ry if rx is None else rx
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return ((u / rx) ** 2 + (v / ry) ** 2 <= 1.0).astype(np.float32)


def _nucleus_mask(kind: str, yy, xx, cy, cx, r, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus mask, pale mask) for a cell centred at (cy, cx) with nucleus radius r (pixels)."""
    pale = np.zeros_like(yy, dtype=np.float32)
    a = rng.uniform(0, 2 * np.pi)
    if kind == "round":
        m = _disc(yy, xx, cy, cx, r * rng.uniform(0.9, 1.0), r, a)
    elif kind == "lobes":
        n = int(rng.integers(3, 6))
        m = np.zeros_like(pale)
        angles = a + np.linspace(-1.6, 1.6, n)
        pts = [(cy + 0.75 * r * np.sin(t), cx + 0.75 * r * np.cos(t)) for t in angles]
        for py, px in pts:
            m = np.maximum(m, _disc(yy, xx, py, px, 0.42 * r))
        for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):  # thin chromatin bridges between lobes
            for f in np.linspace(0, 1, 6):
                m = np.maximum(m, _disc(yy, xx, y0 + f * (y1 - y0), x0 + f * (x1 - x0), 0.12 * r))
    elif kind == "band":
        d = np.hypot(yy - cy, xx - cx)
        ang = np.angle((xx - cx) + 1j * (yy - cy)) - a
        ang = (ang + np.pi) % (2 * np.pi) - np.pi
        m = ((d > 0.55 * r) & (d < r) & (np.abs(ang) < 2.2)).astype(np.float32)
    elif kind == "kidney":
        m = _disc(yy, xx, cy, cx, 0.8 * r, r, a)
        m *= 1 - _disc(yy, xx, cy + 0.9 * r * np.sin(a), cx + 0.9 * r * np.cos(a), 0.55 * r)
    elif kind == "bilobed":
        off = 0.55 * r
        m = np.maximum(_disc(yy, xx, cy + off * np.sin(a), cx + off * np.cos(a), 0.55 * r),
                       _disc(yy, xx, cy - off * np.sin(a), cx - off * np.cos(a), 0.55 * r))
    elif kind == "nucleoli":
        m = _disc(yy, xx, cy, cx, r * rng.uniform(0.9, 1.0), r, a)
        for _ in range(int(rng.integers(1, 3))):
            t, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5 * r)
            pale = np.maximum(pale, _disc(yy, xx, cy + rr * np.sin(t), cx + rr * np.cos(t), 0.16 * r))
    elif kind in ("eccentric", "plasma"):
        off = 0.45 * r
        ny, nx = cy + off * np.sin(a), cx + off * np.cos(a)
        m = _disc(yy, xx, ny, nx, 0.95 * r, r, a)
        if kind == "plasma":  # perinuclear halo (Golgi zone) on the cell-centre side
            pale = _disc(yy, xx, cy - 0.35 * r * np.sin(a), cx - 0.35 * r * np.cos(a), 0.45 * r) * (1 - m)
    elif kind == "smudge":
        noise = _blur(rng.random(yy.shape).astype(np.float32), 4)
        m = (_disc(yy, xx, cy, cx, r * 0.8, r * 1.2, a) * (noise > np.median(noise) * 0.98)).astype(np.float32)
        m = _blur(m, 2)
    elif kind == "platelet":
        m = _disc(yy, xx, cy, cx, r * 0.8, r, a)
    else:
        raise ValueError(f"unknown nucleus kind {kind!r}")
    return m, pale


def render_cell(cell_class: str, size: int, um_per_px: float, stain: Stain, rng: np.random.Generator,
                num_rbc: int | None = None, geometry: tuple[float, float, float] | None = None) -> np.ndarray:
    """One ``size``×``size``×3 uint8 image of a ``cell_class`` cell at ``um_per_px``, centred ± jitter.

    ``geometry``: (size factor, centre y, centre x) of the white cell instead of drawn ones (factor ~U(0.9, 1.1),
    centre size/2 ± 3%): distinct cells rendered with the same geometry are look-alikes (same class, stain, size
    and position; ``synthetic.copies``)."""
    spec = CLASSES[cell_class]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    conc = np.zeros((3, size, size), np.float32)  # stain concentration maps (nuclear, eosin, blue)

    # Red cells: pink discs with a pale centre, partly overlapping the field edges.
    rbc_r = 3.8 / um_per_px
    for _ in range(int(rng.integers(3, 9)) if num_rbc is None else num_rbc):
        cy, cx = rng.uniform(-rbc_r, size + rbc_r, 2)
        ry, rx, gain = rbc_r * rng.uniform(0.9, 1.1), rbc_r * rng.uniform(0.9, 1.1), rng.uniform(0.8, 1.2)
        # Only the disc's bounding window is touched: fields hold hundreds of red cells.
        y0, y1 = max(0, int(cy - ry) - 1), min(size, int(cy + ry) + 2)
        x0, x1 = max(0, int(cx - rx) - 1), min(size, int(cx + rx) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        wy, wx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        disc = _disc(wy, wx, cy, cx, ry, rx)
        centre = _disc(wy, wx, cy, cx, rbc_r * 0.45)
        win = conc[1, y0:y1, x0:x1]
        np.maximum(win, disc * (0.45 - 0.25 * centre) * gain, out=win)

    # The white cell: cytoplasm disc, then nucleus, granules, pale zones.
    if geometry is None:
        r_cell = spec.cell_um / 2 / um_per_px * rng.uniform(0.9, 1.1)
        cy, cx = size / 2 + rng.normal(0, size * 0.03, 2)
    else:
        r_cell, cy, cx = spec.cell_um / 2 / um_per_px * geometry[0], geometry[1], geometry[2]
    cell = _disc(yy, xx, cy, cx, r_cell * rng.uniform(0.92, 1.0), r_cell, rng.uniform(0, np.pi))
    conc[:, cell > 0] = 0.0  # the white cell lies over the red cells
    nucleus, pale = _nucleus_mask(spec.nucleus, yy, xx, cy, cx, spec.nucleus_frac * r_cell, rng)
    nucleus *= cell if spec.nucleus != "smudge" else 1.0
    cyto = cell * (1 - nucleus)
    for s in range(3):
        conc[s] += cyto * spec.cyto[s] * rng.uniform(0.85, 1.15)
    chromatin = 0.85 + 0.3 * _blur(rng.random((size, size)).astype(np.float32), 1)
    conc[0] += nucleus * spec.nucleus_density * chromatin * rng.uniform(0.9, 1.1)
    conc[2] += nucleus * 0.1
    if spec.granule_density > 0:
        speckle = (rng.random((size, size)) < spec.granule_density).astype(np.float32)
        speckle = np.clip(_blur(speckle, 1) * 2.5, 0, 1) * cell
        for s in range(3):
            conc[s] += speckle * spec.granules[s]
    conc *= 1 - 0.55 * pale[None]
    conc = np.clip(_blur(conc.reshape(3 * size, size), 1).reshape(3, size, size), 0, None)

    od = stain.background_od + np.einsum("shw,sc->hwc", conc, stain.vectors())
    od += rng.normal(0, 0.015, od.shape)  # sensor noise
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


def render_field(width: int, height: int, um_per_px: float, stain: Stain, rng: np.random.Generator,
                 wbc: list[tuple[str, float, float]]) -> np.ndarray:
    """A full smear field (for detection/segmentation sets): the listed WBCs (class, cy, cx) on red cells."""
    canvas = render_cell("platelet", max(width, height), um_per_px, stain, rng,
                         num_rbc=int(width * height * (um_per_px ** 2) / 120))[:height, :width].copy()
    for cls, cy, cx in wbc:
        r = int(CLASSES[cls].cell_um / um_per_px * 0.75)
        patch = render_cell(cls, 2 * r, um_per_px, stain, rng, num_rbc=0)
        y0, x0 = int(cy) - r, int(cx) - r
        mask = _disc(*np.mgrid[0:2 * r, 0:2 * r].astype(np.float32), r, r, CLASSES[cls].cell_um / 2 / um_per_px)
        region = canvas[y0:y0 + 2 * r, x0:x0 + 2 * r]
        m = mask[: region.shape[0], : region.shape[1], None]
        region[:] = (m * patch[: region.shape[0], : region.shape[1]] + (1 - m) * region).astype(np.uint8)
    return canvas
