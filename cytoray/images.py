"""Decode and validate image bytes into RGB uint8 — one function for ingestion, embedding and training.

Handles JPEG, PNG, TIFF (8/16-bit, multi-page: first page, page count reported), BMP, GIF; grayscale,
RGBA/LA/palette with transparency (composited on white, like a slide background), CMYK; EXIF orientation.
Anything else raises :class:`ImageRejected` with a stable reason code:

    empty_file | not_an_image | truncated | corrupt | too_small | too_large
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

REASONS = ("empty_file", "not_an_image", "truncated", "corrupt", "too_small", "too_large", "unreadable",
           "no_annotated_cells", "annotation_error")

# Pillow's own bomb guard is turned off: our max_pixels check runs first, from the header, and names it.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Decoded:
    rgb: np.ndarray  # H×W×3 uint8, displayed orientation
    format: str  # JPEG, PNG, TIFF, BMP, ...
    num_frames: int


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode(data: bytes, min_side: int = 16, max_pixels: int = 50_000_000) -> Decoded:
    """Decode ``data``; raise :class:`ImageRejected` for anything that is not a usable cell image."""
    if not data:
        raise ImageRejected("empty_file", "0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", f"{len(data)} bytes in no image format Pillow knows") from None
    except Exception as exc:  # header parsers raise assorted errors on garbage
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected("too_large", f"{w}x{h} exceeds max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise ImageRejected("too_small", f"{w}x{h} is below min_side={min_side}")
    fmt, frames = img.format or "unknown", int(getattr(img, "n_frames", 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if img.getexif().get(0x0112, 1) != 1:  # transpose (a full copy) only when the tag asks for it
                img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img if img.mode == "RGB" else _to_rgb(img))
    except OSError as exc:
        raise ImageRejected("truncated", str(exc)) from None
    except Exception as exc:
        raise ImageRejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    return Decoded(rgb, fmt, frames)


def pixel_sha256(rgb: np.ndarray) -> str:
    """Hash of the decoded pixels (with shape): equal for the same image in any lossless container."""
    h = hashlib.sha256(np.asarray(rgb.shape, np.int64).tobytes())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def encode_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
