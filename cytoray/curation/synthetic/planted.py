"""Stage files with planted copies: what ingest and embed would write for a collection of synthetic cells, some
of them copies of others (exact pixels, JPEG re-encoded, flipped, rotated, cropped, downscaled, recoloured), with
the ground truth. Rendering real pixels for every image is too slow at 10⁵–10⁶ images, so only the fingerprints
are rendered (from real cells and real copies) and the embeddings are synthesised. Used by
``benchmarks/curation.py`` and the sharded-stage tests.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor

import numpy as np

KINDS = ("exact", "reencode", "flip", "rot90", "crop", "resize", "recolour")
SIZE = 64  # rendered cell side, px
DATASETS = 13



def _copy_pixels(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    from cytoray.curation.synthetic.collection import _transform

    if kind == "exact":
        return img
    if kind == "reencode":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=int(rng.integers(70, 95)))
        return np.asarray(Image.open(buf).convert("RGB"))
    return np.ascontiguousarray(_transform(img, kind, rng))


def _render_chunk(args):
    """Fingerprints (uint8) of originals [start, stop) and of the copies of them: (originals, copies, copy sizes)."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell
    from cytoray.features.fingerprint import fingerprint_u8

    seed, start, stop, classes, stains, copies = args
    rng = np.random.default_rng([seed, start])
    cells = [render_cell(CLASS_NAMES[c], SIZE, 0.3, Stain(*stains[i]), rng)
             for i, c in zip(range(start, stop), classes)]
    originals = np.stack([fingerprint_u8(im) for im in cells])
    out, sizes = [], []
    for src, kind in copies:
        im = _copy_pixels(cells[src - start], kind, rng)
        out.append(fingerprint_u8(im))
        sizes.append(im.shape[:2])
    copies_fp = np.stack(out) if out else np.zeros((0,) + originals.shape[1:], np.uint8)
    return originals, copies_fp, sizes


def make_collection(n: int, dim: int, copy_rate: float, seed: int, workers: int = 1):
    """(ingested table, embeddings table, ground truth frame), rows in image_id order."""
    import pandas as pd
    import pyarrow as pa

    from cytoray.curation.synthetic.cells import CLASS_NAMES
    from cytoray.manifest import MANIFEST_SCHEMA
    from cytoray.tables import pack_vectors

    rng = np.random.default_rng(seed)
    n_copies = int(n * copy_rate)
    n_orig = n - n_copies
    share = rng.pareto(1.0, DATASETS) + 0.1
    dataset = rng.choice(DATASETS, n_orig, p=share / share.sum())
    cls = rng.integers(0, len(CLASS_NAMES), n_orig)
    stain_of = rng.uniform([0.8, 0.8, 0.8, -0.15, 0.02], [1.2, 1.2, 1.2, 0.15, 0.06], (DATASETS, 5))
    stains = stain_of[dataset]
    src = np.sort(rng.choice(n_orig, n_copies, replace=False))
    kind = rng.integers(0, len(KINDS), n_copies)
    copy_ds = np.where(rng.random(n_copies) < 0.4, rng.integers(0, DATASETS, n_copies), dataset[src])
    chunk = 2000
    jobs = []
    for a in range(0, n_orig, chunk):
        b = min(n_orig, a + chunk)
        lo, hi = np.searchsorted(src, [a, b])
        jobs.append((seed, a, b, cls[a:b].tolist(), {i: stains[i].tolist() for i in range(a, b)},
                     [(int(s), KINDS[k]) for s, k in zip(src[lo:hi], kind[lo:hi])]))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    fp = np.concatenate([p[0] for p in parts] + [p[1] for p in parts])  # originals, then copies (in src order)
    hw = np.array([(SIZE, SIZE)] * n_orig + [s for p in parts for s in p[2]], np.int32).reshape(-1, 2)

    # embeddings: skewed mixture; a copy = its source + noise
    modes = 2000
    weights = rng.pareto(1.2, modes) + 0.05
    centres = rng.normal(size=(modes, dim)).astype(np.float32)
    which = rng.choice(modes, n_orig, p=weights / weights.sum())
    emb = np.empty((n, dim), np.float32)
    for a in range(0, n_orig, 100_000):
        b = min(n_orig, a + 100_000)
        emb[a:b] = centres[which[a:b]] + 1.2 * rng.standard_normal((b - a, dim), dtype=np.float32)
    emb[n_orig:] = emb[src] + 0.05 * rng.standard_normal((n_copies, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    ds = np.concatenate([dataset, copy_ds])
    labelled = ds % 3 != 0  # a third of the datasets carry no labels
    ids = np.array([f"ds{d:02d}/{i:08d}" for i, d in enumerate(ds)], dtype=object)
    pixel = np.array([f"px{i:08d}" for i in range(n)], dtype=object)
    pixel[n_orig:][kind == KINDS.index("exact")] = pixel[src[kind == KINDS.index("exact")]]
    cell = np.array([CLASS_NAMES[c] for c in np.concatenate([cls, cls[src]])], dtype=object)
    order = np.argsort(ids)
    cols = {"image_id": ids, "uri": np.array([f"synthetic://{i}" for i in ids], dtype=object),
            "dataset": np.array([f"ds{d:02d}" for d in ds], dtype=object),
            "modality": np.where(ds % 4 == 0, "bone_marrow", "peripheral_blood").astype(object),
            "cell_type": np.where(labelled, cell, None), "width": hw[:, 1], "height": hw[:, 0],
            "pixel_sha256": pixel}
    ingested = pa.table({f.name: pa.array(cols[f.name][order], f.type) if f.name in cols else pa.nulls(n, f.type)
                         for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
    embeddings = pa.table({"image_id": pa.array(ids[order], pa.string()), "embedding": pack_vectors(emb[order]),
                           "fingerprint": pack_vectors(fp.reshape(n, -1)[order])})
    truth = pd.DataFrame({"image_id": ids, "kind": ["original"] * n_orig + [
        "exact_duplicate" if KINDS[k] == "exact" else "near_duplicate" for k in kind],
        "duplicate_of": [None] * n_orig + ids[src].tolist(),
        "transform": [None] * n_orig + [KINDS[k] for k in kind], "dataset": ds})
    return ingested, embeddings, truth


def write_run(out: str, ingested, embeddings, settings: dict, parts: int = 0, storage_cfg=None) -> None:
    """The ingest and embed stages' outputs and markers (``stage.run_stage``), as those stages write them;
    ``parts``: as directories of that many part files (multi-file stage files) instead of one file each."""
    from cytoray.curation.shards import write_part
    from cytoray.curation.stage import run_stage

    def publish(run, name, table):
        if not parts:
            run.publish(name, table, sort=False)  # rows are in image_id order already
            return
        step = -(-table.num_rows // parts)
        for i in range(parts):
            write_part(run.uri(name), i, table.slice(i * step, step), storage_cfg)

    def ingest(run):
        publish(run, "ingested.parquet", ingested)
        return {"stage": "ingest", "images": ingested.num_rows}

    def embed(run):
        publish(run, "embeddings.parquet", embeddings)  # manifest order
        return {"stage": "embed", "embedder": "synthetic", "count": embeddings.num_rows,
                "dim": len(embeddings.column("embedding")[0])}

    run_stage("ingest", out, settings, ingest, storage_cfg, force=True)
    run_stage("embed", out, settings, embed, storage_cfg, force=True)
