"""Synthetic acquisition sites: the same cell types, stained and imaged the way different laboratories do it.

Real blood-smear collections differ by site in four physical ways, each of which a :class:`Site` sets:

1. **Staining protocol** — May-Grünwald-Giemsa, Wright-Giemsa or Leishman, by hand or by an automated stainer:
   the strength of the three Romanowsky dye components (azure / haematoxylin-like nuclear purple, eosin, methylene
   blue) and a small shift of their hue; ``cells.Stain`` applies it in optical-density space (Beer–Lambert), with
   slide-to-slide variation of each dye's strength (``stain_jitter``).
2. **Optics** — focus and objective aperture blur the transmitted light: a Gaussian point-spread function of
   ``blur_px`` pixels, applied to the transmittance image (before the camera, where it physically acts).
3. **Illumination and camera colour response** — a halogen lamp is warm (less blue), an LED cool; exposure sets
   the overall gain; the camera's white balance leaves a colour cast on the background; its tone curve
   (``gamma`` on transmittance) and read noise follow.
4. **Resolution** — objective × camera pixel pitch sets micrometres per pixel; a cell of diameter d spans
   d / um_per_px pixels, so sites differ in the cell-size distribution of their images (``um_per_px``, spread
   ``um_per_px_spread`` between images).

The :data:`SITES` differ within ranges plausible for routine laboratories (dye strength within ±20 %, hue within
±0.06 rad, 0.26–0.34 µm/px for 63–100× objectives on common cameras, a PSF of up to ~1 px, warm or cool
illumination within ~12 % per channel). They are not tuned to favour any feature extractor: they are what a stain-, blur- and
scale-invariant representation has to see through. Existing generators (``collection``, ``testing``'s
``write_cell_manifest``) are unchanged; this module is used where a labelled set must span sites
(``cytoray.testing.write_site_manifest``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from cytoray.curation.synthetic.cells import Stain, render_cell


@dataclass(frozen=True)
class Site:
    """How one laboratory stains its smears and images them (see the module docstring for the physics)."""

    stain: Stain = Stain()
    stain_jitter: float = 0.05  # relative s.d. of each dye's strength between slides
    um_per_px: float = 0.30  # micrometres per pixel of the site's camera at its objective
    um_per_px_spread: float = 0.03  # relative s.d. of um_per_px between images
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # R, G, B gain of illuminant x sensor balance
    exposure: float = 1.0  # overall gain (lamp intensity x exposure time); > 1 clips the brightest background
    gamma: float = 1.0  # camera tone curve on transmittance: out = t ** gamma (< 1 brightens mid-tones)
    blur_px: float = 0.0  # Gaussian point-spread function s.d., pixels (focus, aperture)
    read_noise: float = 0.0  # additive sensor noise s.d., fraction of full scale


SITES: dict[str, Site] = {
    # hand-stained May-Grünwald-Giemsa, halogen lamp (warm: blue attenuated), 100x oil, sharp
    "site_a": Site(Stain(1.0, 1.0, 1.0, 0.0), 0.05, 0.28, 0.03, (1.0, 0.97, 0.88), 1.0, 1.0, 0.3, 0.004),
    # automated Wright-Giemsa stainer (more eosin, less azure), LED illumination (cool), slightly soft focus
    "site_b": Site(Stain(0.88, 1.18, 0.92, -0.05), 0.03, 0.31, 0.03, (0.93, 0.98, 1.0), 1.03, 0.9, 0.7, 0.006),
    # Leishman, strong azure / methylene blue, older camera: under-exposed, harder tone curve, lower resolution
    "site_c": Site(Stain(1.15, 0.9, 1.2, 0.06), 0.06, 0.34, 0.04, (1.0, 1.0, 0.95), 0.92, 1.15, 0.5, 0.01),
    # slide scanner at 63x dry: finer pixels, neutral balance, defocus across the field, varied manual staining
    "site_d": Site(Stain(1.05, 0.95, 1.05, 0.02), 0.08, 0.26, 0.05, (0.98, 1.0, 0.98), 1.0, 1.0, 1.0, 0.005),
}


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, edges replicated."""
    if sigma <= 0:
        return img
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(w * pad[i:i + img.shape[0]] for i, w in enumerate(k))  # vertical pass: (H, W + 2r, C)
    return sum(w * rows[:, i:i + img.shape[1]] for i, w in enumerate(k))


def acquire(transmitted: np.ndarray, site: Site, rng: np.random.Generator) -> np.ndarray:
    """The site's microscope and camera applied to an (H, W, 3) uint8 image of transmitted light: PSF blur,
    illuminant x white balance x exposure, read noise, tone curve, 8-bit quantisation."""
    t = transmitted.astype(np.float32) / 255.0
    t = _gaussian_blur(t, site.blur_px)
    t = t * site.exposure * np.asarray(site.white_balance, np.float32)
    if site.read_noise:
        t = t + rng.normal(0.0, site.read_noise, t.shape).astype(np.float32)
    t = np.clip(t, 0.0, 1.0) ** site.gamma
    return np.clip(np.round(255.0 * t), 0, 255).astype(np.uint8)


def slide_stain(site: Site, rng: np.random.Generator) -> Stain:
    """The site's stain with this slide's dye strengths (each scaled by 1 + N(0, stain_jitter))."""
    j = 1.0 + rng.normal(0.0, site.stain_jitter, 3)
    s = site.stain
    return replace(s, nuclear=s.nuclear * j[0], eosin=s.eosin * j[1], blue=s.blue * j[2])


def render_site_cell(cell_class: str, size: int, site: Site, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` x ``size`` x 3 uint8 image of a ``cell_class`` cell as ``site`` stains and images it."""
    um_per_px = site.um_per_px * float(np.exp(rng.normal(0.0, site.um_per_px_spread)))
    return acquire(render_cell(cell_class, size, um_per_px, slide_stain(site, rng), rng), site, rng)
