"""Planted stage files written part by part (``planted.write_planted_run``): multi-file, aligned, in image_id
order, copies that are what the ground truth says, and the same bytes whatever the number of workers."""

import os

import numpy as np

from cytoray.curation.embed import load_embeddings
from cytoray.curation.stage import read_marker
from cytoray.curation.synthetic.copies import FEATURELESS, LOOKALIKE_KINDS
from cytoray.curation.synthetic.planted import KINDS, write_planted_run
from cytoray.tables import read_table


def _parts(out):
    return {name: {p: open(os.path.join(out, name, p), "rb").read() for p in os.listdir(os.path.join(out, name))}
            for name in ("ingested.parquet", "embeddings.parquet")}


def test_streamed_run_is_aligned_deterministic_and_matches_its_truth(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    truth = write_planted_run(a, 600, dim=16, copy_rate=0.2, seed=5, workers=2, part_rows=200, lookalike_rate=0.1)
    again = write_planted_run(b, 600, dim=16, copy_rate=0.2, seed=5, workers=1, part_rows=200, lookalike_rate=0.1)

    # three parts per stage file, byte for byte the same with 2 worker processes as in this process
    parts = _parts(a)
    assert {k: sorted(v) for k, v in parts.items()} == {k: [f"part-{i:05d}.parquet" for i in range(3)]
                                                         for k in parts}
    assert parts == _parts(b)
    assert truth.equals(again) and truth.equals(read_table(f"{a}/truth.parquet").to_pandas())
    assert read_marker(a, "ingest")["images"] == 600 and read_marker(a, "embed")["dim"] == 16

    # rows aligned, in image_id order, the truth's rows
    ing = read_table(f"{a}/ingested.parquet")
    ids, emb, fp = load_embeddings(a)
    assert list(ids) == ing.column("image_id").to_pylist() == sorted(ids) == truth.image_id.tolist()

    # copies: as many as asked, every kind, each of an earlier original, their drawn parameters recorded
    copies = truth[truth.kind.isin(["near_duplicate", "exact_duplicate"])]
    assert len(copies) == 120 and set(copies["transform"]) == set(KINDS) and copies.detail.notna().all()
    assert (copies.duplicate_of < copies.image_id).all()
    assert set(truth.kind[truth.image_id.isin(copies.duplicate_of)]) == {"original"}
    row = {k: r for r, k in enumerate(ids)}
    sha = ing.column("pixel_sha256").to_pylist()
    for c in copies.itertuples():
        i, s = row[c.image_id], row[c.duplicate_of]
        assert float(emb[i] @ emb[s]) > 0.99
        assert (sha[i] == sha[s]) == (c.transform == "exact")  # the source rendered again: the same pixels
        if c.transform == "exact":
            assert (fp["verify"][i] == fp["verify"][s]).all()
        if c.transform == "flip":  # the verification thumbnail of a flipped image is the flipped thumbnail
            v, w = fp["verify"][i], fp["verify"][s]
            assert (v == w[:, ::-1]).all() or (v == w[::-1]).all(), c.detail
    # look-alikes: distinct cells (own pixels, own embedding) next to an original of the same class and dataset
    looks = truth[truth.kind == "lookalike"]
    assert len(looks) == 60 and set(looks["transform"]) == set(LOOKALIKE_KINDS)
    for r in looks.itertuples():
        i, s = row[r.image_id], row[r.lookalike_of]
        assert r.cell_type == truth.cell_type[s] and r.dataset == truth.dataset[s] and sha[i] != sha[s]
        assert float(emb[i] @ emb[s]) < 0.99
    assert truth.cell_type[looks.lookalike_of.map(row)].isin(FEATURELESS).mean() > 0.3  # weighted towards them
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_an_interrupted_run_resumes_with_the_parts_it_wrote(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_planted_run(a, 300, dim=8, copy_rate=0.2, seed=5, part_rows=100)
    write_planted_run(b, 300, dim=8, copy_rate=0.2, seed=5, part_rows=100)
    # b interrupted after its first part: parts 1 and 2 and the truth missing
    for name in ("ingested.parquet", "embeddings.parquet"):
        for i in (1, 2):
            os.remove(os.path.join(b, name, f"part-{i:05d}.parquet"))
    os.remove(os.path.join(b, "truth.parquet"))
    first = os.path.getmtime(os.path.join(b, "embeddings.parquet", "part-00000.parquet"))
    write_planted_run(b, 300, dim=8, copy_rate=0.2, seed=5, part_rows=100, resume=True)
    assert os.path.getmtime(os.path.join(b, "embeddings.parquet", "part-00000.parquet")) == first  # kept
    assert _parts(a) == _parts(b) and read_marker(b, "embed")["count"] == 300
    # other settings: resume starts over rather than mix two collections
    write_planted_run(b, 300, dim=8, copy_rate=0.2, seed=6, part_rows=100, resume=True)
    assert os.path.getmtime(os.path.join(b, "embeddings.parquet", "part-00000.parquet")) > first
