"""Planted stage files written part by part (``planted.write_planted_run``): multi-file, aligned, in image_id
order, copies that are what the ground truth says, and the same bytes whatever the number of workers."""

import os

import numpy as np

from cytoray.curation.embed import load_embeddings
from cytoray.curation.stage import read_marker
from cytoray.curation.synthetic.planted import KINDS, write_planted_run
from cytoray.tables import read_table


def _parts(out):
    return {name: {p: open(os.path.join(out, name, p), "rb").read() for p in os.listdir(os.path.join(out, name))}
            for name in ("ingested.parquet", "embeddings.parquet")}


def test_streamed_run_is_aligned_deterministic_and_matches_its_truth(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    truth = write_planted_run(a, 600, dim=16, copy_rate=0.2, seed=5, workers=2, part_rows=200)
    again = write_planted_run(b, 600, dim=16, copy_rate=0.2, seed=5, workers=1, part_rows=200)

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

    # copies: as many as asked, every kind, each of an earlier original
    copies = truth[truth.kind != "original"]
    assert len(copies) == 120 and set(copies["transform"]) == set(KINDS)
    assert (copies.duplicate_of < copies.image_id).all()
    assert set(truth.kind[truth.image_id.isin(copies.duplicate_of)]) == {"original"}
    row = {k: r for r, k in enumerate(ids)}
    sha = ing.column("pixel_sha256").to_pylist()
    for c in copies.itertuples():
        i, s = row[c.image_id], row[c.duplicate_of]
        assert float(emb[i] @ emb[s]) > 0.99
        assert (sha[i] == sha[s]) == (c.transform == "exact")  # the source rendered again: the same pixels
        if c.transform == "exact":
            assert (fp[i] == fp[s]).all()
        if c.transform == "flip":  # horizontal or vertical; the zoom-1 thumbnail is a 2x2 box mean, flips exactly
            assert (fp[i, 0] == fp[s, 0, :, ::-1]).all() or (fp[i, 0] == fp[s, 0, ::-1]).all()
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
