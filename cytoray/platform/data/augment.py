"""Multi-crop augmentation for DINOv2 on decoded uint8 images, batched per crop size.

Geometry runs on uint8 (crop first — a view — then one PIL resize of the crop only); colour runs once per
batch of same-size crops as tensor maths: brightness/contrast/saturation/hue jitter, grayscale, Gaussian
blur, solarize, and the hematology stain augmentations (HED-space jitter, Reinhard colour transfer from
another image of the batch, RudolfV). Probabilities mean what they say: ``blur_p=1.0`` blurs every crop
(DINOv2's ``GaussianBlur(p)`` passes ``1 - p`` to ``RandomApply``, so its effective blur probabilities
differ from its config; not inherited here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cytoray.features.preprocess import IMAGENET_MEAN, IMAGENET_STD

# Ruifrok & Johnston colour deconvolution (as skimage.color.hed_from_rgb); rows: H, E, DAB in OD space.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
# Reinhard et al. 2001: RGB -> LMS -> log -> l-alpha-beta (decorrelated opponent space).
_LMS = torch.tensor([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LAB = torch.diag(torch.tensor([1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)])) @ torch.tensor(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])


@dataclass
class CropSpec:
    """One kind of crop: how many per image, output size, area range and the photometric probabilities."""

    number: int = 2
    size: int = 224
    scale: tuple[float, float] = (0.32, 1.0)
    blur_p: float = 0.5
    solarize_p: float = 0.0


@dataclass
class AugmentConfig:
    """Defaults follow DinoBloom: DINOv2's multi-crop with vertical flips and 90° rotations, no solarize."""

    global_crops: CropSpec = field(default_factory=lambda: CropSpec(2, 224, (0.32, 1.0), 1.0, 0.0))
    # DINOv2 gives the second global crop blur 0.1 and solarize 0.2; per-crop-index overrides:
    second_global_blur_p: float = 0.1
    second_global_solarize_p: float = 0.0
    local_crops: CropSpec = field(default_factory=lambda: CropSpec(8, 98, (0.05, 0.32), 0.5, 0.0))
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    vflip_p: float = 0.5  # hematology: cells have no up/down
    rot90: bool = True  # random multiple of 90° (DinoBloom)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    hed_p: float = 0.0  # HED-space stain jitter probability
    hed_sigma: float = 0.05  # scale ~ U(1±σ), shift ~ U(±σ) per stain channel
    reinhard_p: float = 0.0  # Reinhard colour transfer from another image of the batch
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def sample_crop_box(h: int, w: int, scale, ratio, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop (torchvision's sampling, 10 tries then centre)."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


_ROTATIONS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def crop_geometry(img: np.ndarray | Image.Image, spec: CropSpec, cfg: AugmentConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """uint8 H×W×3 -> uint8 size×size×3: one resample of the crop box only, then flips / 90° rotation
    (lossless transposes)."""
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    top, left, ch, cw = sample_crop_box(pil.height, pil.width, spec.scale, cfg.ratio, rng)
    out = pil.resize((spec.size, spec.size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < cfg.hflip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.vflip_p:
        out = out.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        if k:
            out = out.transpose(_ROTATIONS[k])
    return np.asarray(out)


class Uniforms:
    """Per-crop U[0, 1) draws, consumed column by column: row i belongs to crop i alone.

    Training fills each crop's row from its sample's own generator (keyed by the global sample position), so
    a crop's photometric choices do not depend on which other images share its batch or rank. A
    ``torch.Generator`` is accepted wherever a ``Uniforms`` is (one draw per crop from it), for direct use.
    """

    COLUMNS = 24  # enough for every photometric draw of one crop (reinhard 2, hed 7, jitter+gray 6, blur 2, solarize 2)

    def __init__(self, u: torch.Tensor):
        self.u, self.used = u, 0  # (n, COLUMNS)

    @classmethod
    def of(cls, g: Uniforms | torch.Generator, n: int) -> Uniforms:
        return g if isinstance(g, Uniforms) else cls(torch.rand(n, cls.COLUMNS, generator=g))

    def take(self, k: int | None = None) -> torch.Tensor:
        """(n,) next column, or (n, k) next k columns."""
        width = 1 if k is None else k
        if self.used + width > self.u.shape[1]:
            raise RuntimeError(f"Uniforms: {self.used + width} draws per crop requested, {self.u.shape[1]} held; "
                               "raise Uniforms.COLUMNS")
        out = self.u[:, self.used : self.used + width]
        self.used += width
        return out[:, 0] if k is None else out


def _per(p: float | torch.Tensor, g: Uniforms) -> torch.Tensor:
    return g.take() < p


def _uniform(lo: float, hi: float, g: Uniforms, k: int | None = None) -> torch.Tensor:
    return lo + (hi - lo) * g.take(k)


_GRAY_W = torch.tensor([0.299, 0.587, 0.114])
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = torch.linalg.inv(_YIQ)


def colour_affine(x: torch.Tensor, cfg: AugmentConfig, g: Uniforms | torch.Generator,
                  grayscale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-crop (A (n,3,3), t (n,3)) such that jitter + grayscale = A·rgb + t.

    Brightness (×b), contrast (towards the crop's mean gray, ×c), saturation (towards the pixel's gray,
    ×s), hue (rotation of the YIQ chroma plane by 2π·h) and grayscale are all affine in RGB, so they are
    composed into one matrix and applied in a single pass, clamping once at the end (sequential
    implementations clamp after every op; the two differ only for pixels pushed out of range mid-way).
    Each crop is jittered with probability ``jitter_p``.
    """
    n = x.shape[0]
    g = Uniforms.of(g, n)
    on = _per(cfg.jitter_p, g).float()

    def factor(strength):
        return 1 + on * _uniform(-strength, strength, g)

    b, c, sat = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    eye = torch.eye(3).expand(n, 3, 3)
    gray_m = _GRAY_W.expand(3, 3)  # every output channel = luma
    m_sat = sat.view(n, 1, 1) * eye + (1 - sat).view(n, 1, 1) * gray_m
    theta = on * _uniform(-cfg.hue, cfg.hue, g) * 2 * math.pi if cfg.hue else torch.zeros(n)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    m = _RGB_FROM_YIQ @ rot @ _YIQ @ m_sat  # (n,3,3)
    if grayscale is not None and grayscale.any():
        m = torch.where(grayscale.view(n, 1, 1), gray_m @ m, m)
    mean_gray = torch.einsum("c,nc->n", _GRAY_W, x.mean(dim=(2, 3)))
    a = m * (c * b).view(n, 1, 1)
    t = (m @ torch.ones(3)) * ((1 - c) * b * mean_gray).view(n, 1)
    return a, t


def apply_affine(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return torch.baddbmm(t.unsqueeze(-1), a, x.reshape(n, 3, -1)).view_as(x).clamp_(0, 1)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: Uniforms | torch.Generator) -> torch.Tensor:
    """x: (N,3,H,W) float in [0,1]; each crop jittered with probability jitter_p."""
    return apply_affine(x, *colour_affine(x, cfg, g))


def gaussian_blur(x: torch.Tensor, p: float | torch.Tensor, sigma_range, g: Uniforms | torch.Generator) -> torch.Tensor:
    """Blur each crop with probability p (a float, or one per crop), sigma ~ U(sigma_range); kernel covers ±3σ
    (odd size)."""
    n = x.shape[0]
    g = Uniforms.of(g, n)
    on, u_sigma = _per(p, g), g.take()
    which = torch.nonzero(on).flatten()
    if len(which) == 0:
        return x
    sigmas = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * u_sigma[which]
    # each crop's kernel covers its own ±3σ (zero beyond), so its result does not depend on the batch's widest σ
    own = torch.ceil(3 * sigmas)
    radius = int(own.max())
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigmas[:, None] ** 2)) * (t[None].abs() <= own[:, None])
    k = k / k.sum(1, keepdim=True)  # (m, K)
    sub = x[which]  # (m,3,H,W)
    m, _, h, w = sub.shape
    kk = k.repeat_interleave(3, 0)  # (3m, K)
    y = F.pad(sub.reshape(1, 3 * m, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, kk.view(3 * m, 1, 1, -1), groups=3 * m)
    y = F.conv2d(y, kk.view(3 * m, 1, -1, 1), groups=3 * m)
    x = x.clone()
    x[which] = y.view(m, 3, h, w)
    return x


def hed_jitter(x: torch.Tensor, p: float, sigma: float, g: Uniforms | torch.Generator) -> torch.Tensor:
    """Stain augmentation in HED optical-density space (Tellez et al. 2018): per crop and stain,
    od' = od·U(1±σ) + U(±σ)."""
    n = x.shape[0]
    g = Uniforms.of(g, n)
    on = _per(p, g).float().view(n, 1, 1)
    od = -torch.log(x.clamp(min=1 / 255.0))
    hed = torch.einsum("ij,njhw->nihw", HED_FROM_RGB.t(), od)
    alpha = 1 + on * _uniform(-sigma, sigma, g, 3).view(n, 3, 1)
    beta = on * _uniform(-sigma, sigma, g, 3).view(n, 3, 1)
    hed = hed * alpha.unsqueeze(-1) + beta.unsqueeze(-1)
    od = torch.einsum("ij,njhw->nihw", RGB_FROM_HED.t(), hed)
    return torch.exp(-od).clamp_(0, 1)


def _to_lab(x: torch.Tensor) -> torch.Tensor:
    lms = torch.einsum("ij,njhw->nihw", _LMS, x).clamp(min=1e-4).log10()
    return torch.einsum("ij,njhw->nihw", _LAB, lms)


def _from_lab(lab: torch.Tensor) -> torch.Tensor:
    lms = torch.pow(10.0, torch.einsum("ij,njhw->nihw", torch.linalg.inv(_LAB), lab))
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(_LMS), lms).clamp_(0, 1)


def reinhard_transfer(x: torch.Tensor, image_index: torch.Tensor, p: float,
                      g: Uniforms | torch.Generator) -> torch.Tensor:
    """Match each selected crop's lαβ mean/std to a crop of a *different* image of the batch (RudolfV).

    The one augmentation that looks beyond its own sample: the donor comes from the images that share the
    batch, so with ``reinhard_p > 0`` a crop's colours depend on how the global batch is split into per-rank
    batches (every other choice is keyed by the sample alone)."""
    n = x.shape[0]
    g = Uniforms.of(g, n)
    on, u_donor = _per(p, g), g.take()
    if len(image_index.unique()) < 2:
        return x
    which = torch.nonzero(on).flatten()
    if len(which) == 0:
        return x
    lab = _to_lab(x[which])
    mu, sd = lab.mean(dim=(2, 3), keepdim=True), lab.std(dim=(2, 3), keepdim=True).clamp(min=1e-3)
    donors = []
    for i in which.tolist():
        others = torch.nonzero(image_index != image_index[i]).flatten()
        donors.append(int(others[min(int(u_donor[i] * len(others)), len(others) - 1)]))
    dlab = _to_lab(x[donors])
    dmu, dsd = dlab.mean(dim=(2, 3), keepdim=True), dlab.std(dim=(2, 3), keepdim=True)
    x = x.clone()
    x[which] = _from_lab((lab - mu) / sd * dsd + dmu)
    return x


class MultiCrop:
    """images (list of uint8 H×W×3) -> {"global_crops": (G,B,3,S,S), "local_crops": (L,B,3,s,s)} float,
    normalised. Every random choice of image i comes from ``rngs[i]`` (geometry first, then one row of
    photometric draws per crop), so an image's views depend on its generator only, not on its batch."""

    def __init__(self, cfg: AugmentConfig | None = None):
        self.cfg = cfg or AugmentConfig()

    def _photometric(self, crops: np.ndarray, image_index: torch.Tensor, blur_p: torch.Tensor | float,
                     solarize_p: float, g: Uniforms) -> torch.Tensor:
        cfg = self.cfg
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)  # (N,3,S,S): the one conversion
        if cfg.reinhard_p:
            x = reinhard_transfer(x, image_index, cfg.reinhard_p, g)
        if cfg.hed_p:
            x = hed_jitter(x, cfg.hed_p, cfg.hed_sigma, g)
        gray = _per(cfg.grayscale_p, g)
        x = apply_affine(x, *colour_affine(x, cfg, g, gray))
        x = gaussian_blur(x, blur_p, cfg.blur_sigma, g)
        if solarize_p:
            sol = _per(solarize_p, g).view(-1, 1, 1, 1)
            x = torch.where(sol & (x >= 0.5), 1 - x, x)
        mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def __call__(self, images: list[np.ndarray], rngs: list[np.random.Generator]) -> dict:
        cfg, b = self.cfg, len(images)
        if len(rngs) != b:
            raise ValueError(f"MultiCrop: {b} images but {len(rngs)} generators (one per image)")
        specs = (("global_crops", cfg.global_crops), ("local_crops", cfg.local_crops))
        pils = [Image.fromarray(img) for img in images]  # wraps, once per image
        # geometry: each image draws its crops from its own generator, global crops first
        geometry = {key: [[crop_geometry(pil, spec, cfg, rng) for _ in range(spec.number)]
                          for pil, rng in zip(pils, rngs)] for key, spec in specs}
        n_crops = cfg.global_crops.number + cfg.local_crops.number
        draws = torch.from_numpy(np.stack([rng.random((n_crops, Uniforms.COLUMNS)) for rng in rngs])
                                 ).float()  # (B, crops, COLUMNS)
        out, first = {}, 0
        for key, spec in specs:
            if spec.number == 0:
                out[key] = torch.zeros(0, b, 3, spec.size, spec.size)
                continue
            crops = np.stack([geometry[key][i][c] for c in range(spec.number) for i in range(b)])  # (n*B,S,S,3)
            g = Uniforms(draws[:, first : first + spec.number].transpose(0, 1).flatten(0, 1))  # crop-major rows
            first += spec.number
            index = torch.arange(b).repeat(spec.number)
            if key == "global_crops" and spec.number >= 2:
                blur = torch.full((spec.number * b,), spec.blur_p)
                blur[b : 2 * b] = cfg.second_global_blur_p
                x = self._photometric(crops, index, blur, 0.0, g)
                if cfg.second_global_solarize_p:
                    x[b : 2 * b] = self._solarize_normalised(x[b : 2 * b], cfg.second_global_solarize_p,
                                                             g.take()[b : 2 * b])
            else:
                x = self._photometric(crops, index, spec.blur_p, spec.solarize_p, g)
            out[key] = x.view(spec.number, b, 3, spec.size, spec.size)
        return out

    def _solarize_normalised(self, x: torch.Tensor, p: float, u: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.cfg.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.cfg.std).view(1, 3, 1, 1)
        raw = x * std + mean
        sol = (u < p).view(-1, 1, 1, 1)
        raw = torch.where(sol & (raw >= 0.5), 1 - raw, raw)
        return (raw - mean) / std
