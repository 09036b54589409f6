"""Building blocks of deduplication and embedding on small hand-checkable inputs, copy detection on real-looking
copies and look-alikes (both steps), and near-duplicate detection against the synthetic ground truth."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cytoray.curation.dedup import (
    DedupConfig,
    candidate_pairs,
    cross_candidate_pairs,
    deduplicate,
    keep_order,
    list_count,
    remove_leakage_and_duplicates,
    select_representatives,
)
from cytoray.curation.synthetic.cells import Stain, render_cell
from cytoray.curation.synthetic.scoring import dedup_precision_recall
from cytoray.features.fingerprint import VIEWS, fingerprint_batch
from cytoray.features.handcrafted import HANDCRAFTED_DIM, handcrafted_features, standardise


def _jpeg(im, quality):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def _fingerprinted(images_by_id: dict, dataset="train", cell_type="lymphocyte"):
    from cytoray import images

    recs = [{"image_id": k, "pixel_sha256": images.pixel_sha256(v), "cell_type": cell_type,
             "width": v.shape[1], "height": v.shape[0], "dataset": dataset} for k, v in images_by_id.items()]
    return pd.DataFrame(recs), fingerprint_batch(list(images_by_id.values()))


def test_greedy_selection_never_chains():
    # 0~1 and 1~2 above the threshold, 0 and 2 not: 1 goes (duplicate of 0), 2 stays; 4~5 -> 5 goes
    keep, dup_of, sim = select_representatives(np.arange(6), np.array([0, 1, 4]), np.array([1, 2, 5]),
                                               np.array([0.99, 0.995, 0.999], np.float32))
    assert keep.tolist() == [True, False, True, True, True, False]
    assert dup_of.tolist() == [-1, 0, -1, -1, -1, 4] and sim[1] == np.float32(0.99)


def test_keep_policy_order():
    rank = keep_order([False, True, True, True], [100, 50, 100, 100], [100, 50, 100, 100],
                      ["a", "a", "b", "a"], ["w", "x", "y", "z"], ["b"])
    # labelled first; then larger; then dataset priority (b); then image_id
    assert rank.tolist() == [3, 2, 0, 1]


def test_deduplicate_exact_and_near_with_policy():
    """An exact copy (kept: the labelled one), a JPEG re-encode (kept: the larger), a distinct cell (kept)."""
    rng = np.random.default_rng(0)
    a, c = render_cell("blast", 96, 0.2, Stain(), rng), render_cell("monocyte", 96, 0.2, Stain(), rng)
    frame, prints = _fingerprinted({"a": a, "b": a.copy(), "c": c, "d": _jpeg(c, 70)})
    frame["cell_type"] = [None, "blast", "monocyte", None]
    frame.loc[3, ["width", "height"]] = 80  # the re-encode is smaller: the original stays
    keep, dups, pairs = deduplicate(frame, DedupConfig(), prints=prints)
    assert keep.tolist() == [False, True, True, False]
    got = {(d["image_id"], d["duplicate_of"], d["reason"], d["transform"]) for d in dups}
    assert got == {("a", "b", "exact", "identical pixels"), ("d", "c", "near_duplicate", "same frame")}
    assert DedupConfig().threshold <= next(d["similarity"] for d in dups if d["image_id"] == "d") < 1.0
    # without fingerprints only exact copies can be told
    keep, dups, _ = deduplicate(frame, DedupConfig())
    assert keep.tolist() == [False, True, True, True] and [d["reason"] for d in dups] == ["exact"]


def test_handcrafted_embedding_is_flip_and_rotation_invariant():
    rng = np.random.default_rng(0)
    img = render_cell("monocyte", 96, 0.25, Stain(), rng)
    f = handcrafted_features(img)
    assert f.shape == (HANDCRAFTED_DIM,) and f.dtype == np.float32
    for variant in (img[:, ::-1], img[::-1], np.rot90(img, 1), np.rot90(img, 2)):
        assert np.abs(handcrafted_features(np.ascontiguousarray(variant)) - f).max() < 0.05
    emb, mean, std = standardise(np.stack([f, f * 1.1, f * 0.9]))
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5) and mean.shape == std.shape == f.shape


def test_scoring_against_ground_truth():
    gt = pd.DataFrame({"image_id": ["o1", "c1", "o2", "c2", "x"], "kind": ["original", "near_duplicate", "original",
                                                                            "exact_duplicate", "original"],
                       "duplicate_of": [None, "o1", None, "o2", None]})
    s = dedup_precision_recall([{"image_id": "c1", "duplicate_of": "o1"}, {"image_id": "x", "duplicate_of": "o2"}], gt)
    assert s["precision"] == 0.5 and s["recall"] == 0.5 and s["recall_by_kind"]["near_duplicate"] == 1.0


def test_vit_embedder_plugs_in_from_a_checkpoint(tmp_path):
    import pyarrow as pa
    import torch
    from PIL import Image

    from cytoray.curation.embed import EmbedConfig, feature_spec
    from cytoray.features.extract import FeatureActor, FeatureSpec
    from cytoray.platform.models.checkpoints import export_dinobloom
    from cytoray.platform.models.vit import build_vit

    torch.manual_seed(0)
    export_dinobloom(build_vit(arch="vit_debug", patch_size=14, img_size=56), str(tmp_path / "b.pth"))
    cfg = EmbedConfig(name="vit", checkpoint=str(tmp_path / "b.pth"), image_size=56)
    rng = np.random.default_rng(0)
    imgs = [render_cell(c, 80, 0.3, Stain(), rng) for c in ("lymphocyte", "eosinophil", "blast")]
    out = FeatureActor(feature_spec(cfg)).features(imgs)
    assert out.shape == (3, 64) and np.isfinite(out).all()
    for k, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / f"{k}.png")
    batch = pa.table({"image_id": ["a", "b", "c"], "uri": [str(tmp_path / f"{k}.png") for k in range(3)]})
    res = FeatureActor(feature_spec(EmbedConfig()))(batch)  # the Ray Data callable, called directly
    assert res.column("image_id").to_pylist() == ["a", "b", "c"]
    assert len(res.column("feature")[0]) == HANDCRAFTED_DIM and len(res.column("fingerprint")[0]) == len(VIEWS) * 32 * 32
    assert len(res.column("verify")[0]) == 96 * 96 and res.column("image_size")[0].as_py() == [80, 80]
    assert "fingerprint" not in FeatureActor(FeatureSpec())(batch).column_names
    try:
        feature_spec(EmbedConfig(name="vit"))
    except ValueError as exc:
        assert "embed.checkpoint" in str(exc)
    else:
        raise AssertionError("vit embedder without a checkpoint must fail")


def test_near_duplicate_detection_meets_the_bars_on_the_test_seed(tmp_path_factory):
    """Planted exact and near duplicates of the demo collection's generator (drawn re-exports; within and across
    datasets, rescaled to the target dataset's width) on the test seed (123)."""
    import os

    import pyarrow.parquet as pq

    from cytoray import images
    from cytoray.curation.synthetic.collection import CollectionSpec, generate_collection

    from ..conftest import SEED

    collection = generate_collection(str(tmp_path_factory.mktemp("dedup")), CollectionSpec(images=1500, seed=SEED))
    collection["root"] = os.path.dirname(collection["ground_truth"])
    ground_truth = pq.read_table(collection["ground_truth"]).to_pandas()

    rows = ground_truth[ground_truth.kind.isin(["original", "near_duplicate", "exact_duplicate"])]
    recs, pixels = [], []
    for r in rows.itertuples():
        rgb = images.decode(open(os.path.join(collection["root"], r.dataset, r.relpath), "rb").read()).rgb
        pixels.append(rgb)
        recs.append({"image_id": r.image_id, "pixel_sha256": images.pixel_sha256(rgb), "cell_type": r.true_class,
                     "width": rgb.shape[1], "height": rgb.shape[0], "dataset": r.dataset})
    keep, dups, pairs = deduplicate(pd.DataFrame(recs), DedupConfig(), prints=fingerprint_batch(pixels))
    scores = dedup_precision_recall(dups, ground_truth)
    print(scores)
    assert scores["planted"] >= 40
    assert scores["recall"] >= 0.95 and scores["precision"] >= 0.98, scores
    assert {d["reason"] for d in dups} == {"exact", "near_duplicate"}
    assert all(DedupConfig().threshold <= d["similarity"] <= 1.0 + 1e-6 for d in dups)  # verified, to a kept image
    assert keep.sum() == len(recs) - len(dups)
    assert len(pairs.a) < 2 * len(recs)  # a few candidates per image, not a similarity threshold's flood


def test_leakage_counts_every_planted_copy_and_takes_precedence():
    """Six copies of each held-out cell planted in training (byte copy, JPEG re-encode, 1.5x resize, flip, a crop
    off one side resized back, another crop left at its size): every copy is leakage, named after its evaluation
    image, none is an in-collection duplicate; distinct cells of the same classes stay."""
    rng = np.random.default_rng(5)
    held_out = {f"eval/{c}": render_cell(c, 96, 0.2, Stain(), rng) for c in ("blast", "monocyte", "eosinophil")}
    planted = {}
    for eid, im in held_out.items():
        planted[f"{eid}/copy"] = im.copy()
        planted[f"{eid}/jpeg"] = _jpeg(im, 85)
        planted[f"{eid}/resize"] = np.asarray(Image.fromarray(im).resize((144, 144), Image.BICUBIC))
        planted[f"{eid}/flip"] = np.ascontiguousarray(im[:, ::-1])
        planted[f"{eid}/crop"] = np.asarray(Image.fromarray(im[:, 7:]).resize((96, 96), Image.BICUBIC))
        planted[f"{eid}/box"] = np.ascontiguousarray(im[6:, :90])
    others = {f"other{k}": render_cell(c, 96, 0.2, Stain(), rng)
              for k, c in enumerate(("blast", "monocyte", "eosinophil"))}
    frame, prints = _fingerprinted({**planted, **others})
    _, eval_prints = _fingerprinted(held_out)
    keep, dups, _ = remove_leakage_and_duplicates(frame, prints, [("eval:held_out.parquet", list(held_out),
                                                                   eval_prints)], DedupConfig())
    leaks = [d for d in dups if d["reason"] == "leakage"]
    assert len(leaks) == len(planted) == 18 and len(dups) == 18, [(d["image_id"], d["reason"]) for d in dups]
    assert all(d["image_id"].startswith(d["duplicate_of"] + "/") for d in leaks)
    assert {d["duplicate_of_dataset"] for d in leaks} == {"eval:held_out.parquet"}
    assert keep.tolist() == [False] * 18 + [True] * 3
    flips = [d["transform"] for d in leaks if d["image_id"].endswith("/flip")]
    assert all(t.startswith("flip horizontal") for t in flips), flips  # the record says which transform


def test_look_alike_cells_are_kept_and_a_one_sided_crop_is_found():
    """Distinct cells of one featureless class, rendered with the same size and position (only details and the red
    cells around differ): all kept, whichever their candidates. A copy cropped off one side and left at its size is a
    verified duplicate, its record a box of about 0.92 of the original's width."""
    from cytoray.curation.synthetic import copies as C

    rng = np.random.default_rng(7)
    geometry = (1.0, 0.0, 0.0)
    cells = {}
    for k in range(12):
        cls = ("basophil", "lymphocyte", "erythroblast")[k % 3]
        field = C.render_field_and_box(cls, 96, 0.2, Stain(), rng, geometry)
        cells[f"cell{k:02d}"] = C.crop(field, C.image_box(96))
    cells["cut"] = np.ascontiguousarray(cells["cell00"][:, :88])  # 8% off the right, not resized back
    frame, prints = _fingerprinted(cells)
    frame.loc[frame.image_id == "cut", "width"] = 88
    keep, dups, pairs = deduplicate(frame, DedupConfig(), prints=prints)
    assert [(d["image_id"], d["duplicate_of"]) for d in dups] == [("cut", "cell00")]
    assert keep.sum() == 12 and len(pairs.a) >= 12  # the look-alikes were candidates, and verification kept them
    assert "box x 0.92 y 1.00" in dups[0]["transform"] and "offset x -0.04" in dups[0]["transform"]


def test_an_unverifiable_candidate_pair_keeps_both_and_is_counted():
    """A copy faded to 2% of its contrast is still the cell's nearest view (band-passed views are normalised), but
    its thumbnail has no structure left to align: the pair is unverifiable (NaN), both images stay, and the stage's
    counts say so."""
    from cytoray.curation.dedup_stage import verification_summary
    from cytoray.curation.synthetic import copies as C

    rng = np.random.default_rng(3)
    cells = {f"cell{k}": C.crop(C.render_field_and_box(("lymphocyte", "monocyte", "basophil")[k], 96, 0.2, Stain(),
                                                       rng, (1.0, 0.0, 0.0)), C.image_box(96)) for k in range(3)}
    a = cells["cell0"].astype(float)
    cells["faded"] = np.clip(a.mean() + (a - a.mean()) * 0.02, 0, 255).round().astype(np.uint8)
    frame, prints = _fingerprinted(cells)
    cfg = DedupConfig()
    keep, dups, pairs = deduplicate(frame, cfg, prints=prints)
    ids = frame.image_id.to_numpy()
    faded = [k for k in range(len(pairs.a)) if {ids[pairs.a[k]], ids[pairs.b[k]]} == {"cell0", "faded"}]
    assert faded and np.isnan(pairs.score[faded]).all(), (pairs.a, pairs.b, pairs.score)
    assert keep.all() and dups == []
    counts = verification_summary(pairs, type(pairs).empty(), cfg)["near"]
    assert counts["unverifiable"] >= 1 and counts["verified"] == 0


def test_copies_never_chain_and_distinct_disks_stay():
    """A chain of crops, each 10% off the left of the one before: the first two are copies of the original (boxes of
    0.90 and 0.81 of it), the third (0.73) is not — its edge to the second does not remove it, since the second is
    removed itself (no chaining) — and the fourth is a copy of the third. Plain disks of growing size, each close to
    the next: no union-find collapse — every removed disk has a verified edge to a kept one."""
    rng = np.random.default_rng(7)
    chain = {"a0": render_cell("blast", 96, 0.2, Stain(), rng)}
    for k in range(1, 5):
        prev = chain[f"a{k - 1}"]
        chain[f"a{k}"] = np.ascontiguousarray(prev[:, round(prev.shape[1] * 0.1):])
    frame, prints = _fingerprinted(chain)
    keep, dups, _ = deduplicate(frame, DedupConfig(), prints=prints)
    assert keep.tolist() == [True, False, False, True, False]
    assert {d["image_id"]: d["duplicate_of"] for d in dups} == {"a1": "a0", "a2": "a0", "a4": "a3"}
    yy, xx = np.mgrid[0:96, 0:96]
    plain = {}
    for k in range(30):
        a = np.clip(20 + 0.8 * k - np.hypot(yy - 48, xx - 48), 0, 1)[..., None]
        plain[f"p{k:02d}"] = (np.array([235, 220, 225]) * (1 - a) + np.array([120, 60, 150]) * a).astype(np.uint8)
    frame, prints = _fingerprinted(plain)
    keep, dups, pairs = deduplicate(frame, DedupConfig(), prints=prints)
    kept = set(frame.image_id[keep])
    assert keep.sum() >= 2 and all(d["duplicate_of"] in kept for d in dups)
    verified = {(int(a), int(b)) for a, b in zip(pairs.a, pairs.b)}
    row = {k: i for i, k in enumerate(frame.image_id)}
    assert all(tuple(sorted((row[d["image_id"]], row[d["duplicate_of"]]))) in verified for d in dups)


def _planted_views(originals: int, copies_per_kind: int, seed: int):
    """Rendered cells plus planted copies of some of them (exact, flipped, rotated 90°, cropped 5% and resized back,
    recoloured) as fingerprints; returns (fingerprints, {(original row, copy row)})."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES

    rng = np.random.default_rng(seed)
    cells = [render_cell(CLASS_NAMES[k % len(CLASS_NAMES)], 64, 0.3, Stain(), rng) for k in range(originals)]
    kinds = {"exact": lambda im: im.copy(), "flip": lambda im: im[:, ::-1], "rot90": lambda im: np.rot90(im),
             "crop": lambda im: np.asarray(Image.fromarray(im[3:61, 3:61]).resize((64, 64), Image.BICUBIC)),
             "recolour": lambda im: np.clip(im * np.array([1.04, 0.96, 1.02]), 0, 255).astype(np.uint8)}
    sources = rng.choice(originals, len(kinds) * copies_per_kind, replace=False)
    planted = set()
    for t, transform in enumerate(kinds.values()):
        for src in sources[t * copies_per_kind:(t + 1) * copies_per_kind].tolist():
            planted.add((src, len(cells)))
            cells.append(np.ascontiguousarray(transform(cells[src])))
    return fingerprint_batch(cells), planted


def test_partitioned_candidate_search_finds_every_planted_copy_and_matches_the_flat_path():
    """Above ``flat_max`` the candidate search is approximate (partitioned); on planted copies it finds what the exact
    search finds, with the same similarities, and the leakage guard's cross search too."""
    prints, planted = _planted_views(originals=600, copies_per_kind=8, seed=3)
    flat, scaled = DedupConfig(), DedupConfig(flat_max=100, list_size=50)
    pairs = {}
    for name, cfg in (("flat", flat), ("scaled", scaled)):
        a, b, s, _ = candidate_pairs(prints["views"], cfg)
        pairs[name] = dict(zip(zip(a.tolist(), b.tolist()), s.tolist()))
    assert planted <= set(pairs["scaled"]), planted - set(pairs["scaled"])
    same = set(pairs["scaled"]) & set(pairs["flat"])
    assert len(same) >= 0.95 * len(pairs["flat"])
    assert np.allclose([pairs["scaled"][p] for p in same], [pairs["flat"][p] for p in same], atol=1e-5)
    src = sorted({a for a, _ in planted})
    evals = {k: v[src] for k, v in prints.items()}
    cross = {}
    for name, cfg in (("flat", flat), ("scaled", scaled)):
        t, e, s, _ = cross_candidate_pairs(prints["views"], evals["views"], cfg)
        cross[name] = set(zip(t.tolist(), e.tolist()))
    assert {(b, src.index(a)) for a, b in planted} <= cross["scaled"] & cross["flat"]


def test_candidate_search_matches_brute_force():
    """Each image's best image per view (the 8 flips/rotations of its view against every other image's same view)
    above the candidate threshold, exact and partitioned, matches a brute-force fp64 search within the int8
    estimate's bound (``dedup.Prints``), which is all a candidate needs."""
    from cytoray.curation.dedup import _directed_candidates
    from cytoray.curation.verification import dihedral_perms

    prints, _ = _planted_views(originals=300, copies_per_kind=6, seed=4)
    views = prints["views"]
    n = len(views)
    x = views.reshape(n, views.shape[1], -1).astype(np.float64)
    x -= x.mean(-1, keepdims=True)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    cfg, tol = DedupConfig(), 0.03
    want = {}
    for v in range(views.shape[1]):
        sims = np.max([x[:, v][:, p] @ x[:, v].T for p in dihedral_perms(32)], axis=0)
        np.fill_diagonal(sims, -2)
        want.update({(q, v): b for q, b in enumerate(sims.max(1))})
    for c in (cfg, DedupConfig(flat_max=50, list_size=40, list_probe=40),
              DedupConfig(flat_max=50, list_size=40, list_probe=40, routing="invariant")):
        q, i, s, v = _directed_candidates(views, views, c, same=True)
        got = {(a, b): float(e) for a, b, e in zip(q.tolist(), v.tolist(), s)}
        assert (q != i).all() and all(e > c.candidate_threshold for e in got.values())
        assert all(abs(e - want[key]) <= tol for key, e in got.items()), c  # the best, up to the estimate's error
        clear = {key for key, b in want.items() if b > c.candidate_threshold + tol}
        assert clear <= got.keys(), (c, clear - got.keys())


def test_int8_estimates_stay_within_their_bound():
    """The int8 product's estimate of a cosine is within e_x + e_y + 3 e_x e_y of it (each row's exact rounding
    error), for rows of every flip/rotation."""
    from cytoray.curation.dedup import Prints, variant_rows8

    rng = np.random.default_rng(7)
    views = np.clip(rng.normal(128, 30, (40, 1, 32, 32)), 0, 255).astype(np.uint8)
    p = Prints(views)
    rows, variants = np.repeat(np.arange(40), 8), np.tile(np.arange(8), 40)
    q = variant_rows8(p, rows, variants).astype(np.int64)
    est = (q @ p.rows8[:, 0].astype(np.int64).T) * p.inv8[rows, 0][:, None] * p.inv8[:, 0][None]
    exact = np.stack([p.exact(np.array([r]), v)[0] for r, v in zip(rows, variants)]) @ p.exact(np.arange(40), 0).T
    bound = p.err8[rows, 0][:, None] + p.err8[:, 0][None] + 3 * p.err8[rows, 0][:, None] * p.err8[:, 0][None]
    assert (np.abs(est - exact) <= bound + 1e-5).all() and bound.max() < 0.05


def test_int8_variant_rows_are_the_quantised_fp32_variants():
    from cytoray.curation.dedup import Prints, variant_rows8

    thumbs = np.random.default_rng(3).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    prints = Prints(thumbs)
    rows, variants = np.repeat(np.arange(5), 24), np.tile(np.arange(24), 5)
    o = np.argsort(variants % 8, kind="stable")
    got = variant_rows8(prints, rows[o], variants[o])
    for r, v, q in zip(rows[o].tolist(), variants[o].tolist(), got):
        x = prints.exact(np.array([r]), v)[0]
        scale = 1 / prints.inv8[r, v // 8]
        assert (q == np.rint(x * scale)).all(), (r, v)  # a flip/rotation of the quantised zoom row
        assert abs(np.linalg.norm(x - q / scale) - prints.err8[r, v // 8]) < 1e-6


def test_every_flip_and_rotation_of_an_image_routes_like_the_image():
    """``route_rows`` is invariant under the 8 flips/rotations (so one routing search serves a zoom's 8 query
    variants) and pools before it sums (16×16 rows for 32×32 thumbnails)."""
    from cytoray.curation.dedup import route_rows

    x = np.random.default_rng(5).standard_normal((6, 32, 32)).astype(np.float32)
    ref = route_rows(x.reshape(6, -1), 2, invariant=True)
    assert ref.shape == (6, 256) and np.allclose(np.linalg.norm(ref, axis=1), 1, atol=1e-6)
    for flip in (False, True):
        for rot in range(4):
            t = np.ascontiguousarray(np.rot90(x[:, :, ::-1] if flip else x, rot, axes=(1, 2))).reshape(6, -1)
            np.testing.assert_allclose(route_rows(t, 2, invariant=True), ref, atol=1e-6)
            if flip or rot:  # the plain route row is the pooled variant's, a different one
                assert np.abs(route_rows(t, 2) - route_rows(x.reshape(6, -1), 2)).max() > 0.1
    assert np.abs(route_rows(x[1:2].reshape(1, -1), 2, invariant=True) - ref[0]).max() > 0.1  # tells images apart
    with pytest.raises(ValueError, match="dedup.routing"):
        list_count(10_000, DedupConfig(routing="sorted"))


def test_closed_lists_route_every_flip_with_one_search():
    """Variant routing trains lists closed under the 8 flips/rotations: one search for variant 0 gives every
    variant's probes (renamed by the group's table), the same lists as searching each variant against all of them."""
    from cytoray.curation import dedup as D

    rng = np.random.default_rng(2)
    protos = rng.standard_normal((40, 16, 16))  # 40 kinds of image, each seen in any flip/rotation, with noise
    x = np.stack([np.rot90(protos[k][:, ::-1] if f else protos[k], r) for k, f, r in
                  zip(rng.integers(0, 40, 3000), rng.integers(0, 2, 3000), rng.integers(0, 4, 3000))])
    x = (x + 0.5 * rng.standard_normal(x.shape)).astype(np.float32)
    rows = D.route_rows(x.reshape(3000, -1), 1)
    lists = D._kmeans_lists(rows, 60, closed=True)
    assert lists.ntotal == 64 and D.closed_lists(lists.reconstruct_n(0, 64))  # ceil(60 / 8) = 8 base centroids
    assert not D.closed_lists(D._kmeans_lists(rows, 64).reconstruct_n(0, 64))
    router = D.Router(lists, False)
    assert router.kind == "closed"
    fast = router.probe(rows[:500], 3)
    # every variant searched on its own against all 64 lists
    perms = D.dihedral_perms(16)
    slow = np.stack([lists.search(np.ascontiguousarray(rows[:500][:, perms[e]]), 3)[1] for e in range(8)], 1)
    assert fast.shape == (500, 8, 3) and (fast == slow).mean() > 0.999  # ties aside
    assert np.array_equal(fast[:, 0], lists.search(rows[:500], 3)[1])
    assert len(np.unique(fast[:, :, 0])) > 32  # the images spread over the lists
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(fast[:, 1], fast[:, 0])  # a quarter turn probes other lists
