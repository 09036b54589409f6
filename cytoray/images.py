"""Decode and validate image bytes into RGB uint8 — one function for ingestion, embedding and training.

Handles JPEG, PNG, TIFF (8/16-bit, multi-page: first page, page count reported), BMP, GIF; grayscale,
RGBA/LA/palette with transparency (composited on white, like a slide background), CMYK; EXIF orientation.
Anything else raises :class:`ImageRejected` with a stable reason code:

    empty_file     0 bytes
    not_an_image   no image format's signature (a spreadsheet saved as .jpg, an HTML error page)
    truncated      an image file that ends early, in its header or its data (an interrupted copy or download)
    corrupt        an image file whose bytes are all there but do not decode (damaged header or data)
    too_small      below ``min_side`` pixels; too_large: above ``max_pixels`` (read from the header)

Truncation is decided from the file's structure where the format allows (JPEG ends with EOI, PNG with IEND,
GIF with its trailer, BMP and TIFF declare sizes and offsets), not from which decoder call failed.
Pillow's process-wide settings (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) are left as the
process set them; its decompression-bomb error is reported as ``too_large`` with the pixel count against
``max_pixels``.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = ("empty_file", "not_an_image", "truncated", "corrupt", "too_small", "too_large", "unreadable",
           "no_annotated_cells", "annotation_error")

SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
              b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


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


def image_format(data: bytes) -> str | None:
    """The format named by the file's signature, or None."""
    return next((fmt for sig, fmt in SIGNATURES.items() if data.startswith(sig)), None)


def ends_early(data: bytes) -> bool | None:
    """Whether an image file stops before its format says it should; None when its structure cannot tell."""
    import struct

    fmt = image_format(data)
    if fmt == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in data[-16:]
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b"\x3b")
    if fmt == "BMP":
        return len(data) < 6 or struct.unpack("<I", data[2:6])[0] > len(data)
    if fmt == "TIFF":
        return _tiff_ends_early(data)
    return None


def _tiff_ends_early(data: bytes) -> bool:
    """The first IFD, and the strips or tiles it points to, must lie inside the file."""
    import struct

    if len(data) < 8:
        return True
    e = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(e + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return True
    n = struct.unpack(e + "H", data[ifd:ifd + 2])[0]
    if ifd + 2 + 12 * n + 4 > len(data):
        return True
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 16: 8}  # BYTE, ASCII, SHORT, LONG, LONG8
    values: dict[int, list[int]] = {}
    for k in range(n):
        tag, typ, count, raw = struct.unpack(e + "HHI4s", data[ifd + 2 + 12 * k: ifd + 14 + 12 * k])
        if tag not in (273, 279, 324, 325) or typ not in (3, 4):
            continue
        width = sizes[typ] * count
        at = raw if width <= 4 else data[struct.unpack(e + "I", raw)[0]:][:width]
        if len(at) < width:
            return True
        values[tag] = list(struct.unpack(e + ("H" if typ == 3 else "I") * count, at[:width]))
    for offsets, counts in ((273, 279), (324, 325)):
        if offsets in values and counts in values:
            if max(o + c for o, c in zip(values[offsets], values[counts])) > len(data):
                return True
    return False


def _unreadable(data: bytes, exc: BaseException) -> ImageRejected:
    """truncated or corrupt, from the file's structure (message as the fallback for formats that cannot tell)."""
    detail = f"{type(exc).__name__}: {exc}"[:300]
    early = ends_early(data)
    if early is None:
        early = "truncated" in str(exc).lower()
    return ImageRejected("truncated" if early else "corrupt", f"{len(data)} bytes; {detail}")


def _bomb_detail(exc: Exception, max_pixels: int, prefix: str) -> str:
    """``too_large`` detail when Pillow refuses the header (above 2 × ``Image.MAX_IMAGE_PIXELS``): the pixel count
    against our limit; Pillow's limit only where it is the lower one."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    if found is None:
        return f"more pixels than Pillow opens (2 x Image.MAX_IMAGE_PIXELS), and {prefix}max_pixels={max_pixels:,}"
    pixels = int(found.group(1))
    if pixels > max_pixels:
        return f"{pixels:,} pixels exceeds {prefix}max_pixels={max_pixels:,}"
    return (f"{pixels:,} pixels is within {prefix}max_pixels={max_pixels:,} but above Pillow's decompression-bomb "
            "limit (2 x PIL.Image.MAX_IMAGE_PIXELS); raise PIL.Image.MAX_IMAGE_PIXELS in the process to read it")


def decode(data: bytes, min_side: int = 16, max_pixels: int = 50_000_000, settings: str = "") -> Decoded:
    """Decode ``data``; raise :class:`ImageRejected` for anything that is not a usable cell image. ``settings``
    is the config section the limits come from (``"ingest"``): the size rejections name ``ingest.max_pixels``."""
    prefix = f"{settings}." if settings else ""
    if not data:
        raise ImageRejected("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():  # bomb warnings (our max_pixels check names the limit), EXIF noise
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", _bomb_detail(exc, max_pixels, prefix)) from None
    except UnidentifiedImageError as exc:
        if image_format(data) is None:
            raise ImageRejected("not_an_image", f"{len(data)} bytes in no image format Pillow knows") from None
        raise _unreadable(data, exc) from None
    except Exception as exc:  # header parsers raise assorted errors on damaged or cut-off headers
        raise _unreadable(data, exc) from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageRejected("too_large", f"{w}x{h} = {w * h:,} pixels exceeds {prefix}max_pixels={max_pixels:,}")
    if min(w, h) < min_side:
        raise ImageRejected("too_small", f"{w}x{h} is below {prefix}min_side={min_side}")
    fmt, frames = img.format or "unknown", int(getattr(img, "n_frames", 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            if img.getexif().get(0x0112, 1) != 1:  # transpose (a full copy) only when the tag asks for it
                img = ImageOps.exif_transpose(img)
            rgb = np.asarray(img if img.mode == "RGB" else _to_rgb(img))
    except Exception as exc:
        raise _unreadable(data, exc) from None
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
