"""Copy verification: find the transform that maps one image onto the other and score the aligned pixels.

Two images are the same picture when one maps onto the other by what re-exports do. On the verification
thumbnails (``features.fingerprint``: the whole image in grey, squashed to 96 × 96) those are: a flip or quarter
turn (``d``, the 8 of the dihedral group, as the search's query variants), a scale per axis (``sx, sy`` in
``SCALE_RANGE``: another box, or a crop resized back) and a shift (``tx, ty``, at most ``MAX_SHIFT`` of the side).
Rescaling the whole image, re-encoding, blur and colour changes leave the squashed geometry alone.

Per candidate pair, batched in torch (``verify_pairs``), all on the band ``BAND`` (difference of Gaussians):

1. **Search** (24 × 24): for each plausible flip/rotation (view similarity within ``D_MARGIN`` of the best, at most
   ``MAX_D``), axis scales on 3 × 3 grids around the estimate from the two canonical windows and around 1 (one
   grid where the estimate is within ``SAME_GRID`` of 1), each with the shift that maps one dark-mass centre onto
   the other; Gauss–Newton refinement of the best. A pair whose coarse alignment correlates below ``COARSE_MIN``
   is no copy (score ``NO_ALIGNMENT``); the finer levels (48 and 96 px) are made only for the images of the pairs
   that remain, and only flips within ``FLIP_MARGIN`` of the pair's best coarse alignment go on.
2. **Refine** (48 × 48): Gauss–Newton on the normalised residual over the overlap (at either size, a hypothesis
   stops iterating once its step moves the frame by at most ``CONVERGED`` pixels).
3. **Score** (96 × 96): the sharper image blurred to the other's resolution (from the images' pixel sizes: a copy
   downscaled to half has lost the finest detail, which is not evidence against it), then the **local mismatch**
   ``L(u) = G*(a-b)² / (G*(a²+b²) + κ·G*1)`` of the standardised band in a Gaussian window ``G`` (σ 3 px) at every
   point of the overlap, regions clipped white left out: 0 where the two agree, 1 where unrelated, 2 where opposite.
   Clipped white is evidence of its own (``_clip_mismatch``): a brighter copy clips the pixels that are brightest
   in the other image, so where one image is white the other may not be clearly darker than where it is not. The
   score is ``1 - max L``: a single region where the pictures differ (another red cell next to the white cell,
   another nucleus shape) makes it low, however well the rest agrees. That is what separates a copy from a
   distinct cell of the same class, stain and size: their global correlation is 0.9-0.95 (the cell's outline
   dominates it), but somewhere their details differ.

A pair whose images cannot be compared (a thumbnail without structure, no overlap of at least ``MIN_OVERLAP`` of
both images, or less than ``MIN_COMPARED`` of the frame left outside clipped regions) is **unverifiable**: ``score``
is NaN and the pair is never a duplicate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_SHIFT = 0.12  # largest shift per axis between the two images, as a fraction of the side (a box moved by 10%)
SCALE_RANGE = (0.75, 1.333)  # axis scales the family allows
MIN_OVERLAP = 0.55  # each image's share inside the other, at least
D_MARGIN = 0.05  # flips/rotations searched: view similarity within this of the best
MAX_D = 3  # ... at most this many
BAND = (1.0, 2.5)  # difference-of-Gaussians band of alignment and score, in pixels of the 96 px thumbnail
ALIGN_SIZES = (24, 48)  # the search runs at the first size, the refinement at both
SAME_GRID = 1.05  # an estimate s0 this close to 1 on both axes: the search's grid around 1 is left out
COARSE_MIN = 0.8  # coarse alignment correlation below which a pair is not refined: no copy
REFINE_ITERATIONS = (4, 5)  # Gauss-Newton iterations at the search's size and at the refinement's
CONVERGED = 0.05  # Gauss-Newton: a row whose step moved the frame by at most this many pixels is done
# flips refined at the finer size: those whose coarse alignment is within this of the pair's best flip (a copy's
# own flip aligned best at 24 px in 381 of 382 copies of the benchmark; the margin keeps near-ties)
FLIP_MARGIN = 0.05
NO_ALIGNMENT = -2.0  # the score of such a pair (below any score of an aligned pair, which is in [-1, 1])
WINDOW_SIGMA = 3.0  # local mismatch window
# floor of the local signal energy, relative to the mean energy: below it, a region's disagreement counts less (flat
# background is not evidence; JPEG blocks in it are not either). 0.1 let two round cells of one class through where
# only their nucleus texture differs; 0.01 failed JPEG copies at quality 50-60 (benchmarks/RESULTS.md)
KAPPA = 0.05
EROSION = 4  # pixels of the overlap's edge not scored (the band-pass there saw the other side of the edge)
NATIVE_BLUR = 0.5  # blur of a thumbnail sampled from a larger image, in thumbnail pixels
CLIPPED = 253  # grey level from which a pixel counts as clipped white ...
CLIPPED_SHARE = 0.8  # ... and the share of clipped pixels around it that makes a region clipped (not sensor noise)
CLIP_TOLERANCE = 12.0  # grey levels: where one image is clipped white, the other is at most this far below its clip level
CLIP_MOSTLY = 0.9  # a grey level of one image at which the other is clipped this often is a clipping level
CLIP_WEIGHT = 2.0  # mismatch per local share of pixels that break it (an eighth of the window: the score 0.75)
MIN_COMPARED = 0.25  # share of a's frame that must remain to compare, else the pair is unverifiable
FLIP_NAMES = ("", "rotate 90", "rotate 180", "rotate 270", "flip horizontal", "flip horizontal, rotate 90",
              "flip horizontal, rotate 180", "flip horizontal, rotate 270")


@dataclass(frozen=True)
class Transform:
    """How image b maps onto image a: b's thumbnail turned by ``d`` (``_variant_rows``' order: flip·4 + quarter
    turns), then scaled about the centre by (sx, sy) and shifted by (tx, ty) fractions of the side: b's pixel at v
    lands at s·v + t in a's frame (centred coordinates), so b shows a box of sx × sy of a's, centred at t."""

    d: int
    sx: float
    sy: float
    tx: float
    ty: float

    def inverse(self) -> Transform:
        """How a maps onto b. With D the flip/rotation and S = diag(sx, sy): u_a = S D u_b + t, so
        u_b = D⁻¹ S⁻¹ (u_a - t) = S' D⁻¹ u_a + t' with S' = D⁻¹ S⁻¹ D (the scales, swapped by a quarter turn)."""
        mats = [_dihedral_matrix(d) for d in range(8)]
        dm = mats[self.d]
        inv = np.linalg.inv(dm)
        d_inv = next(k for k, m in enumerate(mats) if np.allclose(m, inv))
        s_inv = np.diag([1 / self.sx, 1 / self.sy])
        s2 = inv @ s_inv @ dm
        t2 = -(inv @ s_inv @ np.array([self.tx, self.ty]))
        return Transform(d_inv, float(abs(s2[0, 0])), float(abs(s2[1, 1])), float(t2[0]), float(t2[1]))

    def describe(self) -> str:
        """e.g. ``flip horizontal; box x 0.94 y 1.00 of the other's, offset x +0.03 y -0.02``."""
        parts = [FLIP_NAMES[self.d]] if self.d else []
        if abs(self.sx - 1) > 0.015 or abs(self.sy - 1) > 0.015 or abs(self.tx) > 0.01 or abs(self.ty) > 0.01:
            parts.append(f"box x {self.sx:.2f} y {self.sy:.2f} of the other's, offset x {self.tx:+.2f} "
                         f"y {self.ty:+.2f}")
        return "; ".join(parts) or "same frame"


def _dihedral_matrix(d: int) -> np.ndarray:
    """Variant ``d`` (``dihedral``) as a matrix on centred (x, y): a horizontal flip x -> -x first, then quarter turns
    (x, y) -> (y, -x) (``dihedral_points``)."""
    flip, rot = divmod(int(d), 4)
    m = np.diag([-1.0, 1.0]) if flip else np.eye(2)
    r = np.array([[0.0, 1.0], [-1.0, 0.0]])
    for _ in range(rot):
        m = r @ m
    return m


def _torch():
    import torch

    return torch


_BLUR_CACHE: dict = {}


def blur_matrix(n: int, sigma: float):
    """(n, n) Gaussian blur along one axis with edge pixels repeated (rows sum to 1), truncated at 3 sigma."""
    torch = _torch()
    key = (n, round(float(sigma), 3))
    if key not in _BLUR_CACHE:
        r = max(1, int(math.ceil(3 * sigma)))
        offsets = np.arange(-r, r + 1)
        ker = np.exp(-offsets**2 / (2 * sigma * sigma))
        ker /= ker.sum()
        mat = np.zeros((n, n))
        for i in range(n):
            np.add.at(mat[i], np.clip(i + offsets, 0, n - 1), ker)
        _BLUR_CACHE[key] = torch.from_numpy(mat.astype(np.float32))
    return _BLUR_CACHE[key]


def blur(x, sigma):
    """Separable Gaussian blur of (N, 1, H, W) with edges repeated, as two matrix products; ``sigma`` a float or an
    (N,) tensor of per-image sigmas (0: unchanged), grouped by value."""
    torch = _torch()
    if torch.is_tensor(sigma):
        out = x.clone()
        for s in torch.unique(sigma).tolist():
            if s > 0:
                sel = sigma == s
                out[sel] = blur(x[sel], s)
        return out
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    if h > 64:
        return blur_matrix(h, sigma) @ x @ blur_matrix(w, sigma).T
    # small images: the rows' blur as one matrix product over all of them (~2x faster than a batch of small ones)
    rows = (x.reshape(-1, w) @ blur_matrix(w, sigma).T).view(x.shape)
    return blur_matrix(h, sigma) @ rows


def band(x, sigmas):
    return blur(x, sigmas[0]) - blur(x, sigmas[1])


def dihedral(x, d):
    """Variant ``d`` (flip·4 + quarter turns, ``curation.dedup._variant_rows``' order) of (..., H, W)."""
    torch = _torch()
    flip, rot = divmod(int(d), 4)
    if flip:
        x = torch.flip(x, (-1,))
    return torch.rot90(x, rot, (-2, -1)) if rot else x


def dihedral_each(x, ds):
    """Each of (N, 1, H, W) turned by its own ``ds[i]``."""
    out = x.clone()
    for d in np.unique(ds).tolist():
        sel = np.flatnonzero(ds == d)
        out[sel] = dihedral(x[sel], d)
    return out


def resample_matrices(n_out: int, n_in: int, scale, shift, cubic: bool = False):
    """(N, n_out, n_in) interpolation weights along one axis and (N, n_out) validity for output(u) = input((u -
    shift) / scale) in centred coordinates (fractions of the side, 0 at the centre); ``scale``, ``shift`` (N,)
    tensors. Linear or Keys cubic (a = -0.5) taps; an output is valid when its source lies within the input, and an
    invalid one has no weights (its row is 0)."""
    torch = _torch()
    u = (torch.arange(n_out, dtype=torch.float32) + 0.5) / n_out - 0.5
    pos = ((u[None] - shift[:, None]) / scale[:, None] + 0.5) * n_in - 0.5  # (N, n_out) input pixel coordinate
    valid = (pos >= -1e-4) & (pos <= n_in - 1 + 1e-4)
    base = torch.floor(pos)
    frac = pos - base
    if cubic:
        offsets = (-1, 0, 1, 2)
        dist = [frac + 1, frac, 1 - frac, 2 - frac]
        weights = [torch.where(x <= 1, 1.5 * x**3 - 2.5 * x**2 + 1, -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2)
                   for x in dist]
    else:
        offsets, weights = (0, 1), [1 - frac, frac]
    mat = torch.zeros(pos.shape[0], n_out, n_in)
    keep = valid.to(torch.float32)
    for off, w in zip(offsets, weights):
        mat.scatter_add_(2, (base.long() + off).clamp(0, n_in - 1)[..., None], (w * keep)[..., None])
    return mat, valid


def warp(x, sx, sy, tx, ty, cubic=False, mask: bool = True):
    """(N, 1, H, W) images scaled about the centre by (sx, sy) and shifted by (tx, ty) fractions of the side ((N,)
    tensors): output(u) = x((u - t) / s), as two separable resampling products. Returns the warped images (0
    outside the source: ``resample_matrices`` has no weights there) and their validity masks (N, 1, H, W; None
    unless ``mask``)."""
    h, w = x.shape[-2:]
    ry, vy = resample_matrices(h, h, sy, ty, cubic)
    rx, vx = resample_matrices(w, w, sx, tx, cubic)
    g = ry @ x[:, 0] @ rx.transpose(1, 2)
    m = (vy[:, :, None] & vx[:, None, :]).to(x.dtype)[:, None] if mask else None
    return g[:, None], m


def rect_mask(n: int, h: int, w: int, sx, sy, tx, ty, erode: int = 0):
    """(N, 1, H, W) validity mask of ``warp`` with the same parameters, shrunk by ``erode`` pixels per side (the
    overlap is a rectangle: each axis's valid range, eroded on its own)."""
    torch = _torch()

    def valid(size, scale, shift):
        u = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
        pos = ((u[None] - shift[:, None]) / scale[:, None] + 0.5) * size - 0.5
        v = ((pos >= -1e-4) & (pos <= size - 1 + 1e-4)).to(torch.float32)
        if erode:
            v = -torch.nn.functional.max_pool1d(-torch.nn.functional.pad(v[:, None], (erode, erode)), 2 * erode + 1,
                                                stride=1)[:, 0]
        return v

    return (valid(h, sy, ty)[:, :, None] * valid(w, sx, tx)[:, None, :])[:, None]


def dihedral_points(y: np.ndarray, x: np.ndarray, ds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where centred points (y, x) (fractions, 0 at the centre) land in variant ``ds`` of the image (``dihedral``:
    a horizontal flip x -> -x first, then quarter turns counter-clockwise (y, x) -> (-x, y))."""
    flip, rot = ds // 4, ds % 4
    x = np.where(flip == 1, -x, x)
    for k in range(1, 4):
        sel = rot >= k
        y, x = np.where(sel, -x, y), np.where(sel, y, x)
    return y, x


def _evaluate(a, b, d, sx, sy, tx, ty):
    """Masked correlation of a (P, 1, S, S) with b turned by d and warped (linear taps), one hypothesis per row."""
    return _evaluate_many(a, b, d, sx[:, None], sy[:, None], tx[:, None], ty[:, None])[:, 0]


def _evaluate_many(a, b, d, sx, sy, tx, ty):
    """``_evaluate`` of K hypotheses per row: a, b (R, 1, S, S), d (R,), sx, sy, tx, ty (R, K) tensors; returns (R,
    K). b is turned once per row, and its K row resamplings are one product (K·S, S) @ (S, S) per row: the search's
    hypotheses share b instead of copying it K times."""
    torch = _torch()
    r, k = sx.shape
    size = a.shape[-1]
    bd = dihedral_each(b, d)[:, 0]
    ry, vy = resample_matrices(size, size, sy.reshape(-1), ty.reshape(-1))
    rx, vx = resample_matrices(size, size, sx.reshape(-1), tx.reshape(-1))
    rows = torch.bmm(ry.view(r, k * size, size), bd).view(r * k, size, size)
    g = torch.bmm(rows, rx.transpose(1, 2)).view(r, k, size * size)  # 0 outside each hypothesis' overlap
    return _rect_ncc(a, g, vy.view(r, k, size).to(a.dtype), vx.view(r, k, size).to(a.dtype))


def _rect_ncc(a, g, vy, vx):
    """(R, K) correlation of a (R, 1, S, S) with each of K warped images g (R, K, S·S) over their overlap, g being 0
    outside it and the overlap the rectangle of rows ``vy`` and columns ``vx`` (R, K, S) in 0/1: from sums instead
    of masked copies (Σ a·g is a product per row; a's sums over each rectangle are vyᵀ·a·vx), in float64 where sums
    of squares cancel."""
    torch = _torch()
    r, k, _ = g.shape
    size = a.shape[-1]
    a2 = a[:, 0]
    n = (vy.sum(-1) * vx.sum(-1)).double().clamp(min=1)
    sa = ((torch.bmm(vy, a2) * vx).sum(-1)).double()
    saa = ((torch.bmm(vy, a2 * a2) * vx).sum(-1)).double()
    sg, sgg = g.sum(-1).double(), (g * g).sum(-1).double()
    sag = torch.bmm(g, a2.reshape(r, size * size, 1))[..., 0].double()
    cov = sag - sa * sg / n
    var = (saa - sa * sa / n).clamp(min=0) * (sgg - sg * sg / n).clamp(min=0)
    return (cov / var.sqrt().clamp(min=1e-9)).to(a.dtype)


def _search(a, b, ds, centre_a, centre_b, s0x, s0y):
    """Per pair and flip in ``ds`` (P, k) (-1: none), the best (d, sx, sy, tx, ty) on (P, 1, S, S) mid-band
    thumbnails over axis scales on 3 × 3 grids around the canonical windows' estimate s0 and around 1 (one grid
    where s0 is within ``SAME_GRID`` of 1 on both axes: the two would nearly coincide), each with the shift that
    maps b's dark-mass centre onto a's (``centre_*`` (P, 2): y, x centred fractions). Returns the pair index, the
    hypothesis and the correlation of every (pair, flip) row."""
    torch = _torch()
    grid = np.array([(fx, fy) for fx in (0.9, 1.0, 1.11) for fy in (0.9, 1.0, 1.11)])
    one_grid = (np.abs(np.log(s0x)) < np.log(SAME_GRID)) & (np.abs(np.log(s0y)) < np.log(SAME_GRID))
    pair_rows, hyps, fits = [], [], []
    for j in range(ds.shape[1]):
        for grids in (1, 2):
            rows = np.flatnonzero((ds[:, j] >= 0) & (one_grid == (grids == 1)))
            if not len(rows):
                continue
            d = ds[rows, j]
            cy, cx = dihedral_points(centre_b[rows, 0], centre_b[rows, 1], d)
            bases = [(s0x[rows], s0y[rows]), (np.ones(len(rows)), np.ones(len(rows)))][:grids]
            cand = [(np.clip(bx * fx, *SCALE_RANGE), np.clip(by * fy, *SCALE_RANGE)) for bx, by in bases
                    for fx, fy in grid]
            k = len(cand)
            sx = np.stack([h[0] for h in cand], 1).reshape(-1)  # (rows · k,) row-major per pair
            sy = np.stack([h[1] for h in cand], 1).reshape(-1)
            rep = np.repeat(np.arange(len(rows)), k)
            tx = np.clip(centre_a[rows, 1][rep] - sx * cx[rep], -MAX_SHIFT, MAX_SHIFT)
            ty = np.clip(centre_a[rows, 0][rep] - sy * cy[rep], -MAX_SHIFT, MAX_SHIFT)
            f = lambda v: torch.from_numpy(np.ascontiguousarray(v, np.float32).reshape(len(rows), k))  # noqa: E731,B023
            c = _evaluate_many(a[rows], b[rows], d, f(sx), f(sy), f(tx), f(ty)).numpy()
            sel = np.arange(len(rows)) * k + c.argmax(1)
            pair_rows.append(rows)
            hyps.append(np.stack([d, sx[sel], sy[sel], tx[sel], ty[sel]], 1))
            fits.append(c.max(1))
    if not pair_rows:
        return np.zeros(0, np.int64), np.zeros((0, 5)), np.zeros(0)
    return np.concatenate(pair_rows), np.concatenate(hyps), np.concatenate(fits)


def _standardise(x, m):
    """(x - mean) / sd over the mask m, per image; returns it and the sd (N, 1, 1, 1)."""
    n = m.sum((1, 2, 3), keepdim=True).clamp(min=1)
    mean = (x * m).sum((1, 2, 3), keepdim=True) / n
    sd = ((((x - mean) * m) ** 2).sum((1, 2, 3), keepdim=True) / n).sqrt().clamp(min=1e-6)
    return (x - mean) / sd, sd


def _gauss_newton(a, b, t, iterations: int, cubic: bool = False, converged: float | None = None):
    """Refine t (P, 5) by Gauss-Newton on the normalised residual over the overlap: b turned by d and warped,
    parameters log sx, log sy, tx, ty. g(u) = b((u - t) / s), so dg/dt = -grad g and dg/dlog s = -(u - t) grad g
    per axis, grad g the warped image's gradient in fractions of the side. Steps are clipped to 2% in scale and one
    pixel in shift per iteration; a row whose step moved no pixel of the frame by more than ``converged`` pixels
    (default ``CONVERGED``) is done and left out of the iterations after (most rows are done after one or two)."""
    torch = _torch()
    converged = CONVERGED if converged is None else converged
    size = a.shape[-1]
    t = torch.from_numpy(t.astype(np.float32))
    bd = dihedral_each(b, t[:, 0].long().numpy())
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    act = torch.arange(len(t))
    for _ in range(iterations):
        if not len(act):
            break
        ta, aa, ba = t[act], a[act], bd[act]
        g, _ = warp(ba, ta[:, 1], ta[:, 2], ta[:, 3], ta[:, 4], cubic, mask=False)
        m = rect_mask(len(g), size, size, ta[:, 1], ta[:, 2], ta[:, 3], ta[:, 4], erode=1)
        za, _ = _standardise(aa, m)
        zg, sd = _standardise(g, m)
        gx = torch.zeros_like(g)
        gy = torch.zeros_like(g)
        gx[..., 1:-1] = (g[..., 2:] - g[..., :-2]) * (size / 2)
        gy[..., 1:-1, :] = (g[..., 2:, :] - g[..., :-2, :]) * (size / 2)
        ux = u.view(1, 1, 1, -1) - ta[:, 3].view(-1, 1, 1, 1)
        uy = u.view(1, 1, -1, 1) - ta[:, 4].view(-1, 1, 1, 1)
        jac = (torch.stack([-ux * gx, -uy * gy, -gx, -gy], 1)[:, :, 0] * (m / sd)).flatten(2)  # (P, 4, H·W)
        r = ((za - zg) * m).flatten(1)
        h = torch.bmm(jac, jac.transpose(1, 2)) + 1e-3 * torch.eye(4)
        rhs = torch.bmm(jac, r[:, :, None])[..., 0]
        # a flat overlap (sd at its floor) overflows or degenerates the system: that pair keeps its parameters
        step, info = torch.linalg.solve_ex(h, rhs)
        step = torch.where((info == 0)[:, None] & torch.isfinite(step), step, torch.zeros_like(step))
        step[:, :2] = step[:, :2].clamp(-0.02, 0.02)
        step[:, 2:] = step[:, 2:].clamp(-1.0 / size, 1.0 / size)
        t[act, 1] = (ta[:, 1] * torch.exp(step[:, 0])).clamp(*SCALE_RANGE)
        t[act, 2] = (ta[:, 2] * torch.exp(step[:, 1])).clamp(*SCALE_RANGE)
        t[act, 3] = (ta[:, 3] + step[:, 2]).clamp(-MAX_SHIFT, MAX_SHIFT)
        t[act, 4] = (ta[:, 4] + step[:, 3]).clamp(-MAX_SHIFT, MAX_SHIFT)
        # the largest displacement the step made, in pixels: a scale step moves the frame's edge by half of it
        moved = size * torch.maximum(step[:, :2].abs().amax(1) / 2, step[:, 2:].abs().amax(1))
        act = act[moved > converged]
    return t.numpy().astype(np.float64)


def _local_mismatch(a, g, m):
    """max over the overlap of L (module docstring) for (P, 1, S, S) fine-band a, warped g and mask m."""
    torch = _torch()
    m = _erode(m, EROSION)
    n = m.sum((1, 2, 3)).clamp(min=1)

    def z(x):
        mean = (x * m).sum((1, 2, 3), keepdim=True) / n.view(-1, 1, 1, 1)
        var = (((x - mean) * m) ** 2).sum((1, 2, 3), keepdim=True) / n.view(-1, 1, 1, 1)
        return (x - mean) / var.sqrt().clamp(min=1e-6) * m

    za, zg = z(a), z(g)
    # the window's sums at half resolution (2 × 2 means, then the window's half sigma): a quarter of the work
    pool = torch.nn.functional.avg_pool2d
    sums = blur(pool(torch.cat([(za - zg) ** 2, m, za**2 + zg**2], 1), 2), WINDOW_SIGMA / 2)
    num, cov, den = sums[:, :1], sums[:, 1:2], sums[:, 2:] + KAPPA * 2 * sums[:, 1:2]
    local = torch.where(cov > 0.7, num / den.clamp(min=1e-9), torch.zeros_like(num))
    return local.amax((1, 2, 3))


def _clip_mismatch(a, g, ca, cg, m):
    """The clipped regions' part of the mismatch, for (P, 1, S, S) raw grey ``a``, warped ``g``, their clipped-white
    regions ``ca``, ``cg`` and the overlap ``m``. A region clipped in one image holds no detail, but it still says
    something: a brighter copy clips its *brightest* pixels, so where a is clipped white, g must be at least as bright
    (within ``CLIP_TOLERANCE`` grey levels) as where a is not, and the other way round. Pixels that break this (a red cell where the other image is white) are violations;
    the result is CLIP_WEIGHT times their largest local share (the mismatch window), 0 where nothing is clipped."""
    torch = _torch()
    out = torch.zeros(len(a), dtype=a.dtype)
    has = ((ca * m).sum((1, 2, 3)) > 0) | ((cg * m).sum((1, 2, 3)) > 0)
    if not bool(has.any()):
        return out
    i = torch.nonzero(has)[:, 0]
    a, g, ca, cg, m = a[i], g[i], ca[i], cg[i], _erode(m[i], EROSION)
    n = m.sum((1, 2, 3)).clamp(min=1)

    def violations(c_one, c_other, x_other):
        # a brighter copy clips every pixel above some level t of the other image: the other's pixels outside the
        # clipped regions (a ring of 2 px off their blocky edge) lie below t, so their 98th percentile is a lower
        # bound of it; inside, none may lie clearly below that bound
        outside = m * (1 - _dilate(c_one, 2))
        count = outside.sum((1, 2, 3))
        vals = torch.where(outside > 0, x_other, torch.full_like(x_other, -1.0)).flatten(1).sort(1, descending=True)
        level = vals.values.gather(1, (0.02 * count).long()[:, None])[:, 0]
        known = (count >= 0.05 * n).to(a.dtype)  # too little left outside to bound t: no evidence
        below = (x_other < (level - CLIP_TOLERANCE).view(-1, 1, 1, 1)).to(a.dtype)
        return c_one * (1 - c_other) * m * below * known.view(-1, 1, 1, 1)

    def unclipped_where_clipped(c_one, x_one, x_other):
        # and where the other image's grey level is one at which the one is (almost) always clipped, the one may not
        # be clearly darker (a red cell beside the cell where the brighter image has background)
        bins = (x_other.clamp(0, 255) / 4).long().clamp(max=63).flatten(1)  # (P, S·S) grey bins of 4 levels
        w = m.flatten(1)
        count = torch.zeros(len(m), 64, dtype=a.dtype).scatter_add_(1, bins, w)
        clipped = torch.zeros(len(m), 64, dtype=a.dtype).scatter_add_(1, bins, w * c_one.flatten(1))
        mostly = (clipped >= CLIP_MOSTLY * count) & (count >= 20)
        dark = (x_one.flatten(1) < CLIPPED - 2 * CLIP_TOLERANCE).to(a.dtype)
        return (w * dark * mostly.gather(1, bins).to(a.dtype)).view_as(m)

    v = torch.maximum(violations(ca, cg, g), violations(cg, ca, a))
    v = torch.maximum(v, torch.maximum(unclipped_where_clipped(ca, a, g), unclipped_where_clipped(cg, g, a)))
    pool = torch.nn.functional.avg_pool2d
    cov = blur(pool(m, 2), WINDOW_SIGMA / 2)
    share = blur(pool(v, 2), WINDOW_SIGMA / 2) / cov.clamp(min=1e-6)
    local = torch.where(cov > 0.7, share, torch.zeros_like(share))
    out[i] = CLIP_WEIGHT * local.amax((1, 2, 3))
    return out


def _dilate(m, px):
    """Masks (N, 1, H, W) grown by ``px`` pixels."""
    torch = _torch()
    return torch.nn.functional.max_pool2d(m, 2 * px + 1, stride=1, padding=px)


def _erode(m, px):
    """Binary masks (N, 1, H, W) shrunk by ``px`` pixels, outside the frame counting as masked out (a band-pass near
    the frame's edge saw repeated edge pixels, not the other image's content beyond it). A pixel stays where every
    pixel of its (2·px + 1)² window is set: window sums from running sums, one axis after the other (exact for 0/1
    masks, and a third of the work of two min-pools)."""
    torch = _torch()
    if px <= 0:
        return m
    F = torch.nn.functional
    k = 2 * px + 1
    c = F.pad(m, (px + 1, px, px + 1, px), value=0.0).cumsum(-1)
    rows = ((c[..., k:] - c[..., :-k]) > k - 0.5).to(m.dtype)[..., 1:, :]  # full along the row's window ...
    c = F.pad(rows.cumsum(-2), (0, 0, 1, 0))
    return ((c[..., k:, :] - c[..., :-k, :]) > k - 0.5).to(m.dtype)  # ... and along the column's


def _resolution_sigma(side: np.ndarray, size: int) -> np.ndarray:
    """Blur of a thumbnail of ``size`` sampled from an image whose shorter side is ``side`` pixels."""
    return NATIVE_BLUR * np.maximum(1.0, size / np.maximum(side, 1.0))


def initial_scales(frames_a: np.ndarray, frames_b: np.ndarray, ds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sx, sy) that map b's canonical window (turned by ``ds``) onto a's: the search's starting point."""
    ha = frames_a[:, 0, 2:4].astype(np.float64)
    hb = frames_b[:, 0, 2:4].astype(np.float64)
    swap = (ds % 4) % 2 == 1  # a quarter turn swaps the axes
    hb = np.where(swap[:, None], hb[:, ::-1], hb)
    s = np.clip(ha / np.maximum(hb, 1e-6), *SCALE_RANGE)
    return s[:, 0], s[:, 1]


def verify_pairs(prints: dict[str, np.ndarray], sides: np.ndarray, a_idx: np.ndarray, b_idx: np.ndarray,
                 chunk: int = 512):
    """Verify the pairs (a_idx[i], b_idx[i]) of images whose fingerprints are ``prints`` (``features.fingerprint``:
    views (N, V, 32, 32), frames (N, V, 4), verify (N, 96, 96)); ``sides`` (N,) each image's shorter side in pixels.
    Returns score (P,) float32 (NaN: unverifiable), transforms (P, 5) float32 (d, sx, sy, tx, ty: b onto a,
    ``Transform``) and overlap (P,) (the smaller share of either image inside the other)."""
    torch = _torch()
    p = len(a_idx)
    score = np.full(p, np.nan, np.float32)
    trans = np.zeros((p, 5), np.float32)
    overlap = np.zeros(p, np.float32)
    if not p:
        return score, trans, overlap
    order = np.argsort(a_idx, kind="stable")  # pairs of one image in one chunk: its levels are made once
    with torch.no_grad():
        for lo in range(0, p, chunk):
            sel = order[lo:lo + chunk]
            ga, gb = a_idx[sel], b_idx[sel]
            used, inverse = np.unique(np.concatenate([ga, gb]), return_inverse=True)
            thumbs = prints["verify"][used]  # per chunk: memory stays bounded
            ds = candidate_flips(prints["views"][ga], prints["views"][gb])
            s, t, o = _verify_chunk(thumbs, inverse[:len(sel)], inverse[len(sel):], sides[ga], sides[gb], ds,
                                    prints["frames"][ga], prints["frames"][gb])
            score[sel], trans[sel], overlap[sel] = s, t, o
    return score, trans, overlap


def _pool_matrix(n_out: int, n_in: int):
    """(n_out, n_in) the means of ``adaptive_avg_pool2d`` along one axis."""
    torch = _torch()
    mat = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return torch.from_numpy(mat)


def _pooled_band(x, size: int):
    """``adaptive_avg_pool2d(band(x, BAND), size)`` of (N, 1, S, S) as the pooled blur matrices' products (the band
    and the pooling are linear: pool·blur is one (size, S) matrix per sigma, a fraction of the full band's work)."""
    n = x.shape[-1]
    pool = _pool_matrix(size, n)
    lo, hi = pool @ blur_matrix(n, BAND[0]), pool @ blur_matrix(n, BAND[1])
    return lo @ x @ lo.T - hi @ x @ hi.T


def _coarse_levels(thumbs: np.ndarray) -> dict:
    """What the search needs of every image of a chunk: the raw thumbnail's spread and the mid band at 24 px."""
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(thumbs, np.float32))[:, None]
    flat = thumbs.reshape(len(thumbs), -1)
    return {"std": torch.from_numpy(flat.std(1, dtype=np.float32)), "quarter": _pooled_band(x, ALIGN_SIZES[0])}


def _fine_levels(thumbs: np.ndarray) -> dict:
    """What refinement and score need, only of images in a pair that survived the search: the raw thumbnail, the
    mid band at 96 and pooled to 48, the clipped-white regions."""
    torch = _torch()
    F = torch.nn.functional
    x = torch.from_numpy(np.ascontiguousarray(thumbs, np.float32))[:, None]
    mid = band(x, BAND)
    return {"mid": mid, "raw": x, "half": F.adaptive_avg_pool2d(mid, ALIGN_SIZES[1]),
            "clipped": _clipped_regions(x, (thumbs.reshape(len(thumbs), -1) >= CLIPPED).any(1))}


def _clipped_regions(x, any_clipped: np.ndarray):
    """(N, 1, S, S) 1 where at least CLIPPED_SHARE of the 4 × 4 pixels around are clipped white (on a grid of every
    other pixel): a region whose detail was lost (isolated bright pixels of sensor noise do not count). Only images
    with a clipped pixel are looked at (``any_clipped``)."""
    torch = _torch()
    F = torch.nn.functional
    out = torch.zeros_like(x)
    sel = torch.from_numpy(np.flatnonzero(any_clipped))
    if len(sel):
        clipped = (x[sel] >= CLIPPED).to(x.dtype)
        share = F.avg_pool2d(clipped, 4, 2, 1, count_include_pad=False)  # 4 × 4 means at every other pixel
        out[sel] = F.interpolate((share >= CLIPPED_SHARE).to(x.dtype), scale_factor=2, mode="nearest")
    return out


def _verify_chunk(thumbs, ia, ib, side_a, side_b, ds, fa, fb):
    torch = _torch()
    levels = _coarse_levels(thumbs)
    s0x, s0y = initial_scales(fa, fb, np.maximum(ds[:, 0], 0))
    centre_a = fa[:, 0, 1::-1].astype(np.float64) - 0.5  # (y, x) of the dark mass, centred
    centre_b = fb[:, 0, 1::-1].astype(np.float64) - 0.5
    a_i, b_i = torch.from_numpy(ia), torch.from_numpy(ib)
    # every plausible flip searched and refined; the pair keeps the one that aligns best at 48 px
    rows, t, _ = _search(levels["quarter"][a_i], levels["quarter"][b_i], ds, centre_a, centre_b, s0x, s0y)
    ra, rb = a_i[rows], b_i[rows]
    t = _gauss_newton(levels["quarter"][ra], levels["quarter"][rb], t, REFINE_ITERATIONS[0])
    tt = torch.from_numpy(t.astype(np.float32))
    coarse = _evaluate(levels["quarter"][ra], levels["quarter"][rb], t[:, 0].astype(int), tt[:, 1], tt[:, 2],
                       tt[:, 3], tt[:, 4]).numpy()
    # a flip whose coarse alignment correlates below COARSE_MIN is no copy (copies: >= 0.85 in the benchmark; half
    # of the look-alike candidates fall below): the refinement at 48 px and the score run on the rest only
    best = np.full(len(ia), -np.inf)
    np.maximum.at(best, rows, coarse)
    alive = (coarse >= COARSE_MIN) & (coarse >= best[rows] - FLIP_MARGIN)
    p = len(ia)
    score = np.full(p, NO_ALIGNMENT, np.float32)
    flat = ~((levels["std"][a_i] > 1.0) & (levels["std"][b_i] > 1.0)).numpy()
    score[flat] = np.nan  # an image without structure: nothing to compare (unverifiable), whatever the alignment
    trans = np.zeros((p, 5), np.float32)
    share = np.zeros(p, np.float32)
    rows, t = rows[alive], t[alive]
    if not len(rows):
        return score, trans, share
    # the finer levels of the images still in play only (about a third of a chunk's images in the benchmark)
    used, inverse = np.unique(np.concatenate([ia[rows], ib[rows]]), return_inverse=True)
    levels = {"std": levels["std"][torch.from_numpy(used)], **_fine_levels(thumbs[used])}
    a_i, b_i = torch.full((p,), -1, dtype=torch.long), torch.full((p,), -1, dtype=torch.long)
    a_i[rows], b_i[rows] = torch.from_numpy(inverse[:len(rows)]), torch.from_numpy(inverse[len(rows):])
    ra, rb = a_i[rows], b_i[rows]
    t = _gauss_newton(levels["half"][ra], levels["half"][rb], t, REFINE_ITERATIONS[1])
    tt = torch.from_numpy(t.astype(np.float32))
    fit = _evaluate(levels["half"][ra], levels["half"][rb], t[:, 0].astype(int), tt[:, 1], tt[:, 2], tt[:, 3],
                    tt[:, 4]).numpy()
    order = np.lexsort((-fit, rows))
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]  # the best-fitting flip of each pair
    done = rows[first]
    s, t_, o = _score(levels, a_i[done], b_i[done], side_a[done], side_b[done], t[first])
    score[done], trans[done], share[done] = s, t_, o
    score[flat] = np.nan
    return score, trans, share


def _score(levels, a_i, b_i, side_a, side_b, t):
    """Scores (module docstring), transforms and overlaps of aligned pairs."""
    torch = _torch()
    size = levels["mid"].shape[-1]
    # score on the fine band at a common resolution
    sa, sb = _resolution_sigma(side_a, size), _resolution_sigma(side_b, size)
    extra_a = np.sqrt(np.maximum(sb**2 - sa**2, 0.0)).round(1)
    extra_b = np.sqrt(np.maximum(sa**2 - sb**2, 0.0)).round(1)
    af = blur(levels["mid"][a_i], torch.from_numpy(extra_a).float())
    bf = blur(levels["mid"][b_i], torch.from_numpy(extra_b).float())
    tt = torch.from_numpy(t.astype(np.float32))
    d = t[:, 0].astype(int)
    g, m = warp(dihedral_each(bf, d), tt[:, 1], tt[:, 2], tt[:, 3], tt[:, 4], cubic=True)
    # the clipped regions and raw grey levels of b are warped only for the pairs where they count: b's clipped
    # regions where b has any, its grey levels where either image has (``_clip_mismatch``); elsewhere 0
    clipped_a = levels["clipped"][a_i]
    has_a = clipped_a.flatten(1).amax(1) > 0
    has_b = levels["clipped"][b_i].flatten(1).amax(1) > 0

    def warped(x, rows):
        out = torch.zeros_like(g)
        i = torch.nonzero(rows)[:, 0]
        if len(i):
            out[i] = warp(dihedral_each(x[b_i[i]], d[i.numpy()]), tt[i, 1], tt[i, 2], tt[i, 3], tt[i, 4],
                          mask=False)[0]
        return out

    clipped_b = warped(levels["clipped"], has_b)
    # regions white in either image hold no detail to compare (a brighter copy clips its background)
    compared = m * (1 - ((clipped_a + clipped_b) > 0.5).to(m.dtype))
    mismatch = _local_mismatch(af, g, compared)
    raw_b = warped(levels["raw"], has_a | has_b)
    mismatch = torch.maximum(mismatch, _clip_mismatch(levels["raw"][a_i], raw_b, clipped_a, clipped_b, m))
    inside_a = m.mean((1, 2, 3))  # share of a covered by b
    inside_b = (inside_a / (tt[:, 1] * tt[:, 2])).clamp(max=1.0)  # share of b inside a: b spans sx·sy of a's frame
    share = torch.minimum(inside_a, inside_b)
    structured = (levels["std"][a_i] > 1.0) & (levels["std"][b_i] > 1.0)
    ok = structured & (share >= MIN_OVERLAP) & (compared.mean((1, 2, 3)) >= MIN_COMPARED)
    score = torch.where(ok, 1.0 - mismatch, torch.full_like(mismatch, float("nan")))
    return score.numpy(), t.astype(np.float32), share.numpy()


def dihedral_perms(side: int) -> np.ndarray:
    """(8, side²) index maps of the 8 flips/rotations of a flattened side×side grid, in ``_variant_rows``' order
    (flip·4 + quarter turns): ``variant_row = row[perm[d]]``."""
    grid = np.arange(side * side).reshape(side, side)
    return np.stack([np.rot90(grid[:, ::-1] if flip else grid, rot).ravel() for flip in (0, 1) for rot in range(4)])


def candidate_flips(views_a: np.ndarray, views_b: np.ndarray) -> np.ndarray:
    """(P, MAX_D) flips/rotations of b worth searching: those whose view similarity to a (the better of the two
    views) is within D_MARGIN of the best of the 8 (best first; -1 pads). views (P, 2, s, s) uint8 as stored."""
    torch = _torch()
    p, nviews = views_a.shape[:2]

    def unit(x):
        x = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
        x = x - x.mean((1, 2), keepdim=True)
        return x / x.flatten(1).norm(dim=1).clamp(min=1e-6).view(-1, 1, 1)

    sims = torch.full((p, 8), -2.0, dtype=torch.float64)
    for v in range(nviews):
        va, vb = unit(views_a[:, v]), unit(views_b[:, v])
        sims = torch.maximum(sims, torch.stack([(dihedral(vb, d) * va).sum((1, 2)) for d in range(8)], 1).double())
    sims = sims.numpy()
    order = np.argsort(-sims, axis=1, kind="stable")[:, :MAX_D]
    top = np.take_along_axis(sims, order, 1)
    return np.where(top >= top[:, :1] - D_MARGIN, order, -1)
