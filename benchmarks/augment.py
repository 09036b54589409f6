"""Multi-crop throughput at the DinoBloom setting (2×224 global + 8×98 local) on one core.

    python benchmarks/augment.py [--images 256] [--batch 32]

cytoray's ``MultiCrop`` (uint8 crop-then-resize, batched tensor colour ops) against a straightforward PIL
implementation of the same transforms (torchvision-style, one crop at a time: RandomResizedCrop, flips,
90° rotation, ColorJitter via ImageEnhance + HSV hue shift, grayscale, GaussianBlur, normalise), in the
same process, single-threaded. Prints images/s (source images, each giving 10 crops) and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell
from cytoray.platform.data.augment import AugmentConfig, MultiCrop, sample_crop_box


def pil_crop(img: Image.Image, size: int, scale, cfg: AugmentConfig, blur_p: float, rng) -> torch.Tensor:
    w, h = img.size
    top, left, ch, cw = sample_crop_box(h, w, scale, cfg.ratio, rng)
    im = img.resize((size, size), Image.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < cfg.hflip_p:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.vflip_p:
        im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if cfg.rot90:
        im = im.rotate(90 * int(rng.integers(0, 4)))
    if rng.random() < cfg.jitter_p:
        im = ImageEnhance.Brightness(im).enhance(1 + rng.uniform(-cfg.brightness, cfg.brightness))
        im = ImageEnhance.Contrast(im).enhance(1 + rng.uniform(-cfg.contrast, cfg.contrast))
        im = ImageEnhance.Color(im).enhance(1 + rng.uniform(-cfg.saturation, cfg.saturation))
        hsv = np.array(im.convert("HSV"))
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(rng.uniform(-cfg.hue, cfg.hue) * 255)) % 256
        im = Image.fromarray(hsv, "HSV").convert("RGB")
    if rng.random() < cfg.grayscale_p:
        im = im.convert("L").convert("RGB")
    if rng.random() < blur_p:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_sigma)))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(cfg.mean).view(3, 1, 1)) / torch.tensor(cfg.std).view(3, 1, 1)


def pil_multicrop(images: list[np.ndarray], cfg: AugmentConfig, rng) -> dict:
    pils = [Image.fromarray(i) for i in images]
    g, lc = cfg.global_crops, cfg.local_crops
    glob = [pil_crop(im, g.size, g.scale, cfg, g.blur_p if c == 0 else cfg.second_global_blur_p, rng)
            for c in range(g.number) for im in pils]
    loc = [pil_crop(im, lc.size, lc.scale, cfg, lc.blur_p, rng) for _ in range(lc.number) for im in pils]
    return {"global_crops": torch.stack(glob), "local_crops": torch.stack(loc)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core
    rng = np.random.default_rng(0)
    # Source images at a typical single-cell size (Acevedo/PBC: 360x363).
    pool = [np.asarray(Image.fromarray(render_cell(CLASS_NAMES[i % 14], 128, 0.28, Stain(), rng)).resize((360, 363)))
            for i in range(64)]
    images = [pool[i % len(pool)] for i in range(args.images)]
    cfg = AugmentConfig()  # DinoBloom setting: 2x224 global, 8x98 local
    mc = MultiCrop(cfg)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    mc(batches[0], [np.random.default_rng([0, i]) for i in range(args.batch)])
    pil_multicrop(batches[0][:2], cfg, rng)  # warm-up
    t0 = time.perf_counter()
    for b in batches:
        out = mc(b, [np.random.default_rng([0, i]) for i in range(len(b))])
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    for b in batches:
        ref = pil_multicrop(b, cfg, rng)
    slow = time.perf_counter() - t0
    assert out["global_crops"].shape[2:] == ref["global_crops"].shape[1:]
    print(f"torch threads: {torch.get_num_threads()}; {args.images} images, 2x224 + 8x98 crops each")
    print(f"PIL reference    {args.images / slow:8.1f} images/s per core")
    print(f"cytoray MultiCrop{args.images / fast:8.1f} images/s per core   ratio: {slow / fast:.2f}x")


if __name__ == "__main__":
    main()
