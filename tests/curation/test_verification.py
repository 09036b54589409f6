"""Copy verification on hand-made pairs: the transform found is the one applied, copies score high and distinct
look-alikes low, what cannot be compared is unverifiable, and the records read right in both directions."""

import io

import numpy as np
import pytest
from PIL import Image

from cytoray.curation.synthetic import copies as C
from cytoray.curation.synthetic.cells import Stain
from cytoray.curation.verification import NO_ALIGNMENT, Transform, candidate_flips, verify_pairs
from cytoray.features.fingerprint import fingerprint_batch


def _field(cls="monocyte", seed=0, geometry=None):
    rng = np.random.default_rng(seed)
    return C.render_field_and_box(cls, 96, 0.2, Stain(), rng, geometry)


def _verify(images):
    """Scores, transforms of pairs (images[0], images[k]) for k >= 1."""
    fp = fingerprint_batch(images)
    n = len(images) - 1
    s, t, o = verify_pairs(fp, fp["size"].min(1).astype(float), np.zeros(n, int), np.arange(1, n + 1))
    return s, t


def test_the_transform_found_is_the_one_applied():
    field = _field()
    a = C.crop(field, C.image_box(96))
    flipped = np.ascontiguousarray(a[:, ::-1])
    cut = np.ascontiguousarray(a[:, 10:])  # a box of 86 / 96 of the width, its centre 5 px to the right
    turned_cut = np.ascontiguousarray(np.rot90(cut))
    half = np.asarray(Image.fromarray(a).resize((48, 48), Image.BILINEAR))
    s, t = _verify([a, flipped, cut, turned_cut, half])
    assert (s > 0.85).all(), s
    assert t[0, 0] == 4 and np.allclose(t[0, 1:], [1, 1, 0, 0], atol=0.02)  # flip horizontal
    assert np.allclose(t[1, 1:], [86 / 96, 1, 5 / 96, 0], atol=0.015), t[1]
    d, sx, sy, tx, ty = t[2]
    assert d in (1, 3) and np.isclose(Transform(int(d), sx, sy, tx, ty).inverse().inverse().sx, sx)
    assert np.allclose(t[3, 1:], [1, 1, 0, 0], atol=0.02) and s[3] > 0.85  # half the pixels: the same frame


def test_inverse_and_description():
    t = Transform(5, 0.9, 1.1, 0.05, -0.02)  # flip horizontal, rotate 90
    inv = t.inverse()
    back = inv.inverse()
    assert back.d == t.d and np.allclose([back.sx, back.sy, back.tx, back.ty], [t.sx, t.sy, t.tx, t.ty])
    # b's point u maps to a at S D u + t; a's point maps back by the inverse
    u = np.array([0.1, -0.2])
    from cytoray.curation.verification import _dihedral_matrix

    to_a = np.diag([t.sx, t.sy]) @ _dihedral_matrix(t.d) @ u + [t.tx, t.ty]
    to_b = np.diag([inv.sx, inv.sy]) @ _dihedral_matrix(inv.d) @ to_a + [inv.tx, inv.ty]
    assert np.allclose(to_b, u)
    assert Transform(0, 1, 1, 0, 0).describe() == "same frame"
    assert Transform(4, 0.92, 1.0, -0.04, 0.0).describe() == \
        "flip horizontal; box x 0.92 y 1.00 of the other's, offset x -0.04 y +0.00"


def test_look_alikes_score_low_and_blank_images_are_unverifiable():
    geometry = (1.0, 0.0, 0.0)
    images = [C.crop(_field("basophil", seed, geometry), C.image_box(96)) for seed in range(4)]
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "JPEG", quality=60)
    jpeg = np.asarray(Image.open(buf).convert("RGB"))
    blank = np.full((96, 96, 3), 240, np.uint8)
    s, _ = _verify(images + [jpeg, blank])
    assert (s[:3] < 0.6).all() or (s[:3] == NO_ALIGNMENT).any(), s  # twins: same class, stain, size, position
    assert s[3] > 0.75  # the JPEG copy at quality 60
    assert np.isnan(s[4])  # nothing to compare: both stay


def test_candidate_flips_put_the_matching_flip_first():
    a = C.crop(_field("blast", 3), C.image_box(96))
    fp = fingerprint_batch([a, np.ascontiguousarray(np.rot90(a, 2))])
    ds = candidate_flips(fp["views"][[0]], fp["views"][[1]])
    assert ds.shape == (1, 3) and ds[0, 0] == 2  # a half turn


@pytest.mark.parametrize("size", [40, 150])
def test_small_and_large_images_verify(size):
    a = C.crop(_field("eosinophil", 5), C.image_box(96))
    big = np.asarray(Image.fromarray(a).resize((size, size), Image.LANCZOS))
    s, _ = _verify([a, big])
    assert s[0] > 0.8, s


def test_clipped_white_is_evidence_where_the_other_image_is_dark():
    """A brighter copy clips its background: it still verifies. But where one image is clipped white the other may not
    hold a red cell that the brighter image would have kept (the look-alike that a clipped copy aligns with)."""
    import torch

    from cytoray.curation.verification import _clip_mismatch, _clipped_regions

    a = C.crop(_field("plasma_cell", 1), C.image_box(96))
    bright = np.clip(a.astype(np.float32) * 1.14, 0, 255).astype(np.uint8)
    assert (bright >= 253).mean() > 0.4
    s, _ = _verify([a, bright])
    assert s[0] > 0.9, s  # the copy, its background clipped

    g = np.asarray(Image.fromarray(bright).convert("L"), np.float32)
    other = np.asarray(Image.fromarray(a).convert("L"), np.float32).copy()
    yy, xx = np.mgrid[:96, :96]
    inner = (np.minimum(yy, xx) > 14) & (np.maximum(yy, xx) < 82)
    white = np.argwhere((g >= 253) & inner & ((yy - 48) ** 2 + (xx - 48) ** 2 > 30**2))[0]  # clipped, off the cell
    other[(yy - white[0]) ** 2 + (xx - white[1]) ** 2 < 8**2] = 200.0  # a red cell there in the other image

    def mismatch(x, y):
        tx, ty = (torch.from_numpy(v)[None, None] for v in (x, y))
        clip = [_clipped_regions(t, np.array([True])) for t in (tx, ty)]
        return float(_clip_mismatch(tx, ty, clip[0], clip[1], torch.ones_like(tx))[0])

    plain = np.asarray(Image.fromarray(a).convert("L"), np.float32)
    assert mismatch(g, plain) < 0.1  # the copy: where bright is white, the original is bright too
    assert mismatch(g, other) > 0.5  # a dark disc where the copy is white: no copy
    assert mismatch(other, g) > 0.5  # either way round


def test_rectangle_correlation_equals_the_masked_definition():
    """The search scores its hypotheses from sums over the overlap's rectangle (``_rect_ncc``); that is the masked
    correlation of the warped images, whatever the scale and shift (overlaps from full to a corner)."""
    import torch

    from cytoray.curation.verification import _evaluate_many, dihedral_each, warp

    def masked_ncc(a, g, m):  # the definition: mean-removed correlation of a and g over the mask m
        n = m.sum((-2, -1)).clamp(min=1)
        ac = (a - (a * m).sum((-2, -1), keepdim=True) / n[..., None, None]) * m
        gc = (g - (g * m).sum((-2, -1), keepdim=True) / n[..., None, None]) * m
        return (ac * gc).sum((-2, -1)) / ((ac**2).sum((-2, -1)) * (gc**2).sum((-2, -1))).sqrt().clamp(min=1e-9)

    rng = np.random.default_rng(0)
    r, k, size = 6, 5, 24
    a = torch.from_numpy(rng.normal(size=(r, 1, size, size)).astype(np.float32))
    b = torch.from_numpy(rng.normal(size=(r, 1, size, size)).astype(np.float32)) + 0.5 * a
    d = rng.integers(0, 8, r)
    sx, sy = (torch.from_numpy(rng.uniform(0.75, 1.33, (r, k)).astype(np.float32)) for _ in range(2))
    tx, ty = (torch.from_numpy(rng.uniform(-0.12, 0.12, (r, k)).astype(np.float32)) for _ in range(2))
    d[0], sx[0, 0], sy[0, 0], tx[0, 0], ty[0, 0] = 0, 1, 1, 0, 0  # row 0's first hypothesis: b as it is
    fast = _evaluate_many(a, b, d, sx, sy, tx, ty)
    bd = dihedral_each(b, d)
    for j in range(k):
        g, m = warp(bd, sx[:, j], sy[:, j], tx[:, j], ty[:, j])
        assert torch.allclose(fast[:, j], masked_ncc(a, g, m)[:, 0], atol=1e-5)
    assert 0.3 < fast[0, 0] < 0.6 and (fast.abs() < 0.3).sum() > r * k - 3  # b holds half of a: as it is, they correlate


def test_refinement_stops_where_it_converged():
    """Gauss-Newton leaves a hypothesis once its step moves the frame by at most CONVERGED pixels: the result is the
    full iteration's, to well under a pixel."""
    import torch

    from cytoray.curation import verification as V

    field = _field("lymphocyte", 2)
    a = C.crop(field, C.image_box(96))
    shifted = np.ascontiguousarray(a[3:, 5:])  # a box 93 x 91 of 96, moved
    fp = fingerprint_batch([a, shifted])
    x = torch.from_numpy(fp["verify"].astype(np.float32))[:, None]
    half = V._pooled_band(x, 48)
    start = np.array([[0, 1.0, 1.0, 0.0, 0.0]])
    full = V._gauss_newton(half[[0]], half[[1]], start, 12, converged=0.0)
    early = V._gauss_newton(half[[0]], half[[1]], start, 12)
    assert np.allclose(full[0, 1:3], [91 / 96, 93 / 96], atol=0.02), full  # it found the box ...
    assert np.abs(full - early).max() * 48 < 0.25  # ... and stopping early moved it by under a quarter pixel
