"""Near-duplicate fingerprints: each image's centre square as small gray thumbnails at a few zooms.

Global colour statistics cannot tell a re-export from another cell of the same class and source; this instance
fingerprint can (``curation.dedup.dihedral_knn_edges`` compares them under the 8 dihedral symmetries). Stored as
uint8 (lossless, 3 KB per image); compared as float32 with each thumbnail's mean removed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

FINGERPRINT_SIZE = 32
FINGERPRINT_ZOOMS = (1.0, 1.08, 1.16)


def fingerprint_u8(rgb_u8: np.ndarray, size: int = FINGERPRINT_SIZE,
                   zooms: tuple[float, ...] = FINGERPRINT_ZOOMS) -> np.ndarray:
    """(len(zooms), size, size) uint8 gray thumbnails of the centre square (side = shorter side / zoom)."""
    h, w = rgb_u8.shape[:2]
    gray = Image.fromarray(rgb_u8).convert("L")
    out = np.empty((len(zooms), size, size), np.uint8)
    for z, zoom in enumerate(zooms):
        s = max(1, int(min(h, w) / zoom))
        top, left = (h - s) // 2, (w - s) // 2
        out[z] = np.asarray(gray.resize((size, size), Image.BOX, box=(left, top, left + s, top + s)))
    return out


def fingerprints_from_u8(u8: np.ndarray) -> np.ndarray:
    """(N, Z, s, s) uint8 -> float32 thumbnails with each one's mean removed (what dedup compares)."""
    x = u8.astype(np.float32)
    return x - x.mean(axis=(-2, -1), keepdims=True)


def fingerprint_thumbnails(rgb_u8: np.ndarray, size: int = FINGERPRINT_SIZE,
                           zooms: tuple[float, ...] = FINGERPRINT_ZOOMS) -> np.ndarray:
    """(len(zooms), size, size) float32 near-duplicate fingerprints of one image.

    Each is the centre square (side = shorter side / zoom) as a size×size gray thumbnail with its mean
    removed: aspect changes do not stretch it, brightness/contrast changes barely move it after
    normalisation, and the zoomed variants match copies that were slightly cropped and resized back.
    Global colour statistics cannot tell a re-export from another cell of the same class and source;
    this instance fingerprint can (see ``dedup.dihedral_knn_edges``).
    """
    return fingerprints_from_u8(fingerprint_u8(rgb_u8, size, zooms)[None])[0]


def fingerprints_of_table(table) -> np.ndarray:
    """The ``fingerprint`` column of a features table as (N, Z, s, s) uint8 thumbnails, as stored (a quarter of
    float32's memory; ``curation.dedup`` removes each one's mean as it compares them)."""
    from cytoray.tables import unpack_vectors

    fp = unpack_vectors(table.column("fingerprint"), np.uint8)
    return fp.reshape(table.num_rows, len(FINGERPRINT_ZOOMS), FINGERPRINT_SIZE, FINGERPRINT_SIZE)
