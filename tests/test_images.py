import io

import numpy as np
import pytest
from PIL import Image

from cytoray import images
from cytoray.curation.synthetic.collection import _bad_file
from cytoray.curation.synthetic.layouts import encode

RGB = (np.random.default_rng(0).integers(0, 255, (40, 60, 3))).astype(np.uint8)


@pytest.mark.parametrize("fmt,mode", [
    ("png", "RGB"), ("jpg", "RGB"), ("tiff", "RGB"), ("bmp", "RGB"), ("png", "L"), ("png", "RGBA"),
    ("png", "P"), ("jpg", "CMYK"), ("tiff", "I;16"), ("tiff", "multipage"),
])
def test_decodes_every_supported_kind_to_rgb(fmt, mode):
    dec = images.decode(encode(RGB, fmt, 95, mode))
    assert dec.rgb.dtype == np.uint8 and dec.rgb.shape == (40, 60, 3)
    assert dec.num_frames == (2 if mode == "multipage" else 1)
    if (fmt, mode) in (("png", "RGB"), ("tiff", "RGB"), ("bmp", "RGB"), ("png", "RGBA"), ("tiff", "multipage")):
        assert np.array_equal(dec.rgb, RGB)  # lossless: exact pixels (RGBA alpha=255 composites to itself)
    if mode == "I;16":  # 16-bit scaled back to 8-bit: the grayscale values survive
        gray = np.asarray(Image.fromarray(RGB).convert("L"))
        assert np.abs(dec.rgb[..., 0].astype(int) - gray).max() <= 1


def test_exif_orientation_is_applied():
    yy, xx = np.mgrid[0:40, 0:60]
    smooth = np.stack([xx * 4, yy * 6, np.full_like(xx, 128)], -1).astype(np.uint8)  # orientation-revealing ramp
    data = encode(smooth, "jpg", 95, "exif")
    assert Image.open(io.BytesIO(data)).size == (40, 60)  # stored rotated
    dec = images.decode(data)
    assert dec.rgb.shape == (40, 60, 3)  # displayed upright
    assert np.abs(dec.rgb.astype(int) - smooth).mean() < 3


def test_transparency_composites_on_white():
    rgba = np.zeros((20, 20, 4), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert (images.decode(buf.getvalue()).rgb == 255).all()


@pytest.mark.parametrize("kind", ["empty_file", "truncated", "not_an_image", "too_small", "too_large"])
@pytest.mark.parametrize("fmt", ["jpg", "png", "tiff"])
def test_rejections_have_reasons(kind, fmt):
    data = _bad_file(kind, fmt, np.random.default_rng(1))
    with pytest.raises(images.ImageRejected) as err:
        images.decode(data)
    assert err.value.reason == kind


def _damaged(data: bytes, start: int, n: int = 40) -> bytes:
    out = bytearray(data)
    for k in range(start, start + n):
        out[k] ^= 0xFF
    return bytes(out)


@pytest.mark.parametrize("fmt", ["jpg", "png", "tiff", "bmp"])
def test_truncated_means_the_file_ends_early_and_corrupt_means_it_does_not_decode(fmt):
    big = (np.random.default_rng(2).integers(0, 255, (96, 96, 3))).astype(np.uint8)
    data = encode(big, fmt, 95)
    for cut in (12, 40, len(data) // 2, len(data) - 40):  # cut inside the header or the data
        with pytest.raises(images.ImageRejected) as err:
            images.decode(data[:cut])
        assert err.value.reason == "truncated", (cut, err.value)
    # Every byte present, some damaged: PNG's compressed data, JPEG's Huffman table (JPEG decoders, like TIFF and
    # BMP ones, turn damaged pixel data into damaged pixels without an error).
    where = {"png": len(data) // 2, "jpg": data.find(b"\xff\xc4") + 4}
    if fmt in where:
        with pytest.raises(images.ImageRejected) as err:
            images.decode(_damaged(data, where[fmt], 30))
        assert err.value.reason == "corrupt", err.value
    if fmt == "jpg":  # a damaged segment length in the header reads past the end: still corrupt, not truncated
        with pytest.raises(images.ImageRejected) as err:
            images.decode(_damaged(data, 4, 26))
        assert err.value.reason == "corrupt", err.value


def test_limits_are_configurable():
    data = encode(RGB, "png")
    with pytest.raises(images.ImageRejected, match="too_small"):
        images.decode(data, min_side=50)
    with pytest.raises(images.ImageRejected, match="too_large"):
        images.decode(data, max_pixels=40 * 60 - 1)


def test_too_large_names_the_setting_and_the_pixel_count_not_pillows_bomb_message():
    """A header beyond Pillow's decompression-bomb limit (60000x60000) is reported as the curation setting the user
    can change, with the image's size, however Pillow words its refusal."""
    with pytest.raises(images.ImageRejected) as bomb:
        images.decode(_bad_file("too_large", "png", np.random.default_rng(0)), settings="ingest")
    assert bomb.value.reason == "too_large"
    assert bomb.value.detail == "3,600,000,000 pixels exceeds ingest.max_pixels=50,000,000"
    with pytest.raises(images.ImageRejected) as ours:
        images.decode(encode(RGB, "png"), max_pixels=1000, settings="ingest")
    assert ours.value.detail == "60x40 = 2,400 pixels exceeds ingest.max_pixels=1,000"


def test_pixel_hash_ignores_container_but_not_pixels():
    h = images.pixel_sha256(images.decode(encode(RGB, "png")).rgb)
    assert h == images.pixel_sha256(images.decode(encode(RGB, "tiff")).rgb)
    assert h == images.pixel_sha256(images.decode(encode(RGB, "bmp")).rgb)
    assert h != images.pixel_sha256(images.decode(encode(RGB[:, ::-1].copy(), "png")).rgb)
