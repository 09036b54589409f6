"""Stage files with planted copies: what ingest and embed would write for a collection of synthetic cells, some
of them copies of others (exact pixels, JPEG re-encoded, flipped, rotated, cropped, downscaled, recoloured), with
the ground truth. Rendering real pixels for every image is too slow at 10⁵–10⁶ images, so only the fingerprints
are rendered (from real cells and real copies) and the embeddings are synthesised.

:func:`make_collection` + :func:`write_run` build the tables in memory (small collections; the sharded-stage
tests); :func:`write_planted_run` writes any number of images part by part in bounded memory, in parallel
(``benchmarks/curation.py``)."""

from __future__ import annotations

import functools
import io
import multiprocessing
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


# --- streaming: any number of images in bounded memory -------------------------------------------------------------
#
# Cell p (its position in image_id order) is rendered from its own generators: pixels from rng([seed, 1, p]),
# embedding noise from rng([seed, 2, p]), a copy's transform and embedding noise from rng([seed, 3, p]). A copy
# renders its source (an earlier original) again instead of keeping it, so a part needs only its own rows of the
# plan — the few per-image integers the seed gives (dataset, class, mode, kind, source) — and the parts render in
# parallel, each writing its own part files.

MODES = 2000  # embedding mixture modes


def _plan(n: int, copy_rate: float, seed: int) -> dict[str, np.ndarray]:
    """Per position p in [0, n): dataset (own), stain_ds (the rendered cell's dataset), cls, mode, kind (index
    into KINDS, -1 for originals) and source (the position of the original whose pixels the row shows; p itself
    for originals). Drawn as in :func:`make_collection` (Pareto dataset sizes, distinct sources, 40% of copies in
    a random dataset); a copy's position is uniform after its source's."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES

    rng = np.random.default_rng([seed, 0])
    n_copies = int(n * copy_rate)
    n_orig = n - n_copies
    share = rng.pareto(1.0, DATASETS) + 0.1
    ds = rng.choice(DATASETS, n_orig, p=share / share.sum()).astype(np.int8)
    cls = rng.integers(0, len(CLASS_NAMES), n_orig, dtype=np.int8)
    weights = rng.pareto(1.2, MODES) + 0.05
    mode = rng.choice(MODES, n_orig, p=weights / weights.sum()).astype(np.int16)
    src = rng.choice(n_orig, n_copies, replace=False)
    kind = rng.integers(0, len(KINDS), n_copies, dtype=np.int8)
    copy_ds = np.where(rng.random(n_copies) < 0.4, rng.integers(0, DATASETS, n_copies), ds[src]).astype(np.int8)
    # items: originals 0..n_orig-1, then copies; sorting random keys gives the positions, a copy's key above its
    # source's (stable sort: an equal key still puts the original, listed first, before it)
    key = rng.random(n_orig)
    order = np.argsort(np.concatenate([key, key[src] + (1 - key[src]) * rng.random(n_copies)]), kind="stable")
    del key
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    rendered = np.concatenate([np.arange(n_orig), src])[order]  # item of the original each position shows
    return {"dataset": np.concatenate([ds, copy_ds])[order], "stain_ds": ds[rendered], "cls": cls[rendered],
            "mode": mode[rendered], "kind": np.concatenate([np.full(n_orig, -1, np.int8), kind])[order],
            "source": position[rendered], "stains": rng.uniform([0.8, 0.8, 0.8, -0.15, 0.02],
                                                                [1.2, 1.2, 1.2, 0.15, 0.06], (DATASETS, 5))}


def _ids(positions: np.ndarray, valid: np.ndarray | None = None):
    """Image ids ``c%09d`` of positions as an Arrow string array (null where not ``valid``), built digit by digit
    without a Python string per row."""
    import pyarrow as pa

    keep = positions if valid is None else positions[valid]
    chars = np.empty((len(keep), 10), np.uint8)  # (N, 10)
    chars[:, 0] = ord("c")
    for k in range(9):
        chars[:, 9 - k] = keep // 10**k % 10 + ord("0")
    width = np.full(len(positions), 10, np.int32) if valid is None else np.where(valid, 10, 0).astype(np.int32)
    offsets = np.concatenate([np.zeros(1, np.int32), np.cumsum(width, dtype=np.int32)])
    nulls = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.StringArray.from_buffers(len(positions), pa.py_buffer(offsets), pa.py_buffer(chars), nulls)


@functools.lru_cache(maxsize=2)
def _centres(seed: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, 4]).normal(size=(MODES, dim)).astype(np.float32)


def _original(seed: int, p: int, cls: int, stain, centre: np.ndarray):
    """Pixels and unnormalised embedding of original ``p``, from its own generators."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell

    img = render_cell(CLASS_NAMES[cls], SIZE, 0.3, Stain(*stain), np.random.default_rng([seed, 1, p]))
    return img, centre + 1.2 * np.random.default_rng([seed, 2, p]).standard_normal(len(centre), np.float32)


def _write_planted_part(job) -> int:
    """Render rows [start, stop) and write them as part ``index`` of both stage files; returns the row count."""
    import pyarrow as pa

    from cytoray import images, storage
    from cytoray.curation.shards import write_part
    from cytoray.curation.synthetic.cells import CLASS_NAMES
    from cytoray.features.fingerprint import fingerprint_u8
    from cytoray.manifest import MANIFEST_SCHEMA
    from cytoray.tables import pack_vectors

    out, storage_cfg, seed, dim, index, start, rows = job
    n = len(rows["kind"])
    centres = _centres(seed, dim)
    fp = np.empty((n, 3, 32, 32), np.uint8)
    emb = np.empty((n, dim), np.float32)
    hw = np.empty((n, 2), np.int32)
    sha = []
    for r in range(n):
        img, emb[r] = _original(seed, int(rows["source"][r]), int(rows["cls"][r]),
                                rows["stains"][rows["stain_ds"][r]], centres[rows["mode"][r]])
        if rows["kind"][r] >= 0:  # a copy: its source's pixels transformed, its embedding plus noise
            rng = np.random.default_rng([seed, 3, start + r])
            img = _copy_pixels(img, KINDS[rows["kind"][r]], rng)
            emb[r] += 0.05 * rng.standard_normal(dim, np.float32)
        fp[r] = fingerprint_u8(img)
        hw[r] = img.shape[:2]
        sha.append(images.pixel_sha256(img))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    ids = _ids(np.arange(start, start + n))
    ds = rows["dataset"]
    names = np.array([f"ds{d:02d}" for d in range(DATASETS)], dtype=object)[ds]
    cols = {"image_id": ids, "uri": [f"synthetic://{d}/{i}" for d, i in zip(names, ids.to_pylist())],
            "dataset": names, "modality": np.where(ds % 4 == 0, "bone_marrow", "peripheral_blood").astype(object),
            "cell_type": np.where(ds % 3 != 0, np.array(CLASS_NAMES, dtype=object)[rows["cls"]], None),  # a third
            "width": hw[:, 1], "height": hw[:, 0], "pixel_sha256": sha}  # of the datasets carry no labels
    ingested = pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type)
                         for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
    write_part(storage.join_uri(out, "ingested.parquet"), index, ingested, storage_cfg)
    del ingested
    embeddings = pa.table({"image_id": ids, "embedding": pack_vectors(emb),
                           "fingerprint": pack_vectors(fp.reshape(n, -1))})
    write_part(storage.join_uri(out, "embeddings.parquet"), index, embeddings, storage_cfg)
    return n


def _truth(plan: dict[str, np.ndarray]):
    """The ground truth (image_id, kind, duplicate_of, transform, dataset) as an Arrow table, in position order."""
    import pyarrow as pa

    n = len(plan["kind"])
    copy = plan["kind"] >= 0
    kind = pa.DictionaryArray.from_arrays(pa.array(np.where(copy, 1 + (plan["kind"] != KINDS.index("exact")), 0)),
                                          ["original", "exact_duplicate", "near_duplicate"])
    transform = pa.DictionaryArray.from_arrays(pa.array(np.where(copy, plan["kind"], 0), mask=~copy), list(KINDS))
    return pa.table({"image_id": _ids(np.arange(n)), "kind": kind.cast(pa.string()),
                     "duplicate_of": _ids(plan["source"], copy),
                     "transform": transform.cast(pa.string()), "dataset": pa.array(plan["dataset"].astype(np.int64))})


def write_planted_run(out: str, n: int, dim: int = 384, copy_rate: float = 0.05, seed: int = 0, workers: int = 1,
                      part_rows: int = 32_768, storage_cfg=None, resume: bool = False):
    """What ingest and embed write for ``n`` synthetic cells with planted copies (as :func:`make_collection`), in
    memory bounded by ``part_rows`` whatever ``n``: ``ingested.parquet/`` and ``embeddings.parquet/`` as
    directories of part files (``part_rows`` rows each, rows aligned, image ids ``c%09d`` in generation order),
    rendered by ``workers`` processes; then ``truth.parquet`` and the ingest and embed markers. Any earlier stage
    markers in ``out`` are removed first. Returns the ground truth (pandas, as :func:`make_collection`'s).

    Memory: the caller holds a few bytes per image (≈ 0.7 GB at 5M images); a worker one part, ≈ 1.1 GB at the
    default 32,768 rows, most of it Parquet's writer on the fingerprint lists (``shards.write_part``). Workers
    are spawned, so a script calling this with ``workers > 1`` needs an ``if __name__ == "__main__"`` guard.

    ``resume``: keep the parts an interrupted call with the same arguments wrote (``planted.json`` records them;
    a part counts once its embeddings file, written last and atomically, exists) and render only the rest."""
    import json
    from concurrent.futures import as_completed

    from cytoray import console, storage, tables
    from cytoray.curation.shards import remove
    from cytoray.curation.stage import STAGES, marker_uri, run_stage

    if n < 1 or part_rows < 1 or not 0 <= copy_rate <= 0.5:  # every copy has a source of its own
        raise ValueError(f"write_planted_run: n={n} and part_rows={part_rows} must be >= 1, copy_rate={copy_rate} "
                         "in [0, 0.5]")
    plan = _plan(n, copy_rate, seed)
    settings = {"planted": {"images": n, "dim": dim, "copy_rate": copy_rate, "seed": seed, "part_rows": part_rows}}
    record = storage.join_uri(out, "planted.json")
    resume = resume and storage.exists(record, storage_cfg) and \
        json.loads(storage.read_bytes(record, storage_cfg)) == settings
    # markers first, so that nothing counts as done while the files are replaced; then the old files (fewer
    # parts than before would leave stale ones)
    for stage in STAGES:
        remove(marker_uri(out, stage), storage_cfg)
    if not resume:
        for name in ("ingested.parquet", "embeddings.parquet"):
            remove(storage.join_uri(out, name), storage_cfg)
        storage.write_bytes(record, json.dumps(settings).encode(), storage_cfg)

    per_row = ("dataset", "stain_ds", "cls", "mode", "kind", "source")
    jobs = [(out, storage_cfg, seed, dim, i, a, {**{k: plan[k][a:a + part_rows] for k in per_row},
                                                 "stains": plan["stains"]})
            for i, a in enumerate(range(0, n, part_rows))]
    progress = console.Progress("planted images", n, "images")
    if resume:
        from cytoray.curation.shards import part_uri

        done = {j[4] for j in jobs if storage.exists(part_uri(storage.join_uri(out, "embeddings.parquet"), j[4]),
                                                     storage_cfg)}
        progress.update(increment=sum(len(j[6]["kind"]) for j in jobs if j[4] in done))
        jobs = [j for j in jobs if j[4] not in done]
    try:
        if workers <= 1:
            for job in jobs:
                progress.update(increment=_write_planted_part(job))
        else:  # spawned, not forked: a worker's memory is its own part, not a copy of this process
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for done in as_completed([pool.submit(_write_planted_part, job) for job in jobs]):
                    progress.update(increment=done.result())
    finally:
        progress.close()
    del jobs

    truth = _truth(plan)
    del plan
    tables.write_table(storage.join_uri(out, "truth.parquet"), truth, storage_cfg, sort=False)
    run_stage("ingest", out, settings, lambda run: {"stage": "ingest", "images": n}, storage_cfg, force=True)
    run_stage("embed", out, settings, lambda run: {"stage": "embed", "embedder": "synthetic", "count": n,
                                                   "dim": dim}, storage_cfg, force=True)
    return truth.to_pandas()
