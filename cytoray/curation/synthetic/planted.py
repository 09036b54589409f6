"""Stage files with planted copies and look-alikes: what ingest and embed would write for a collection of synthetic
cells, some of them copies of others (``synthetic.copies``: re-encoded, flipped, rotated, re-cropped on one or two
sides, boxed again, rescaled, blurred, recoloured, stain-shifted, pairs of these; parameters drawn from ranges) and
some of them distinct cells made to look like another (same class, stain, size and position, or an overlapping crop
of the same smear), with the ground truth. Every image is rendered (96 px cells) and fingerprinted as the embed stage
does (``features.fingerprint``); the embeddings are synthesised.

:func:`make_collection` builds the tables in memory (small collections; the sharded-stage tests);
:func:`write_planted_run` writes any number of images part by part in bounded memory, in parallel
(``benchmarks/curation.py``). Both render the same rows from the same plan.

Row p (its position in image_id order) is rendered from its own generators, so a part needs only its own rows of the
plan — the few per-image integers the seed gives (dataset, class, mode, kind, source) — and the parts render in
parallel: a derived row renders its source's field again from the source's generators ([seed, 1, source] for the
cell, [seed, 5, source] for its size and position), then transforms it with [seed, 3, p] (copies) or renders a new
cell with [seed, 6, p] (look-alikes). Embedding noise comes from [seed, 2, p].
"""

from __future__ import annotations

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from cytoray.curation.synthetic.copies import COPY_KINDS, FEATURELESS, LOOKALIKE_KINDS

KINDS = COPY_KINDS  # the planted copies' kinds (truth.transform)
TRUTH_KINDS = ("original", "exact_duplicate", "near_duplicate", "lookalike")
SIZE = 96  # rendered cell side, px
UM_PER_PX = 0.2  # 96 px span 19 µm: a neutrophil's diameter is two thirds of the side
DATASETS = 13
MODES = 2000  # embedding mixture modes
LOOKALIKE_WEIGHT = 3.0  # featureless classes are this much likelier to get a look-alike planted next to them
_TWIN, _OVERLAP = len(COPY_KINDS), len(COPY_KINDS) + 1  # plan kinds after the copy kinds


def _plan(n: int, copy_rate: float, lookalike_rate: float, seed: int) -> dict[str, np.ndarray]:
    """Per position p in [0, n): dataset (own), stain_ds (the rendered cell's dataset), cls, mode, kind (-1 original,
    an index into COPY_KINDS for a copy, _TWIN / _OVERLAP for a look-alike) and source (the original the row
    derives from; p itself for originals). Dataset sizes Pareto-distributed; copies' sources distinct; 40% of copies
    in a random dataset; look-alikes in their source's dataset, 80% twins; a derived row's position is uniform after
    its source's."""
    from cytoray.curation.synthetic.cells import CLASS_NAMES

    rng = np.random.default_rng([seed, 0])
    n_copies, n_look = int(n * copy_rate), int(n * lookalike_rate)
    n_orig = n - n_copies - n_look
    share = rng.pareto(1.0, DATASETS) + 0.1
    ds = rng.choice(DATASETS, n_orig, p=share / share.sum()).astype(np.int8)
    cls = rng.integers(0, len(CLASS_NAMES), n_orig, dtype=np.int8)
    weights = rng.pareto(1.2, MODES) + 0.05
    mode = rng.choice(MODES, n_orig, p=weights / weights.sum()).astype(np.int16)
    src = rng.choice(n_orig, n_copies, replace=False)
    kind = rng.integers(0, len(COPY_KINDS), n_copies, dtype=np.int8)
    copy_ds = np.where(rng.random(n_copies) < 0.4, rng.integers(0, DATASETS, n_copies), ds[src]).astype(np.int8)
    featureless = np.isin(np.array(CLASS_NAMES)[cls], FEATURELESS)
    w = np.where(featureless, LOOKALIKE_WEIGHT, 1.0)
    look_src = rng.choice(n_orig, n_look, replace=False, p=w / w.sum()) if n_look else np.zeros(0, np.int64)
    look_kind = np.where(rng.random(n_look) < 0.8, _TWIN, _OVERLAP).astype(np.int8)
    sources = np.concatenate([src, look_src])
    # items: originals 0..n_orig-1, then copies, then look-alikes; sorting random keys gives the positions, a derived
    # row's key above its source's (stable sort: an equal key still puts the original, listed first, before it)
    key = rng.random(n_orig)
    order = np.argsort(np.concatenate([key, key[sources] + (1 - key[sources]) * rng.random(len(sources))]),
                       kind="stable")
    del key
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    rendered = np.concatenate([np.arange(n_orig), sources])[order]  # the original each position derives from
    return {"dataset": np.concatenate([ds, copy_ds, ds[look_src]])[order], "stain_ds": ds[rendered],
            "cls": cls[rendered], "mode": mode[rendered],
            "kind": np.concatenate([np.full(n_orig, -1, np.int8), kind, look_kind])[order],
            "source": position[rendered],
            "stains": rng.uniform([0.8, 0.8, 0.8, -0.15, 0.02], [1.2, 1.2, 1.2, 0.15, 0.06], (DATASETS, 5))}


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


def _source_field(seed: int, source: int, cls: int, stain) -> tuple[np.ndarray, tuple]:
    """The field of original ``source`` and its cell's geometry, from the original's own generators."""
    from cytoray.curation.synthetic import copies as C
    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain

    geometry = C.draw_geometry(SIZE, np.random.default_rng([seed, 5, source]))
    field = C.render_field_and_box(CLASS_NAMES[cls], SIZE, UM_PER_PX, Stain(*stain),
                                   np.random.default_rng([seed, 1, source]), geometry)
    return field, geometry


def render_row(seed: int, p: int, kind: int, source: int, cls: int, stain) -> tuple[np.ndarray, str | None]:
    """Pixels of row ``p`` and what was done to make it (None for an original)."""
    from cytoray.curation.synthetic import copies as C
    from cytoray.curation.synthetic.cells import CLASS_NAMES, Stain, render_cell

    field, geometry = _source_field(seed, source, cls, stain)
    box = C.image_box(SIZE)
    if kind < 0:
        return C.crop(field, box), None
    if kind < len(COPY_KINDS):
        return C.make_copy(field, box, COPY_KINDS[kind], np.random.default_rng([seed, 3, p]))
    rng = np.random.default_rng([seed, 6, p])
    if kind == _TWIN:  # another cell of the class, the same size and position, the same stain
        twin = C.render_field_and_box(CLASS_NAMES[cls], SIZE, UM_PER_PX, Stain(*stain), rng, geometry)
        return C.crop(twin, box), "twin: same class, stain, size and position"
    canvas = render_cell(CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))], C.overlap_canvas_size(SIZE), UM_PER_PX,
                         Stain(*stain), rng)
    return C.make_overlap(field, box, canvas, rng)


def _render_part(seed: int, dim: int, start: int, rows: dict):
    """(ingested table, embeddings table, transform details) of rows [start, start + len)."""
    import pyarrow as pa

    from cytoray import images
    from cytoray.curation.synthetic.cells import CLASS_NAMES
    from cytoray.features.fingerprint import fingerprint_columns
    from cytoray.manifest import MANIFEST_SCHEMA
    from cytoray.tables import pack_vectors

    n = len(rows["kind"])
    centres = _centres(seed, dim)
    emb = np.empty((n, dim), np.float32)
    pixels, sha, details = [], [], []
    for r in range(n):
        p, kind, src = start + r, int(rows["kind"][r]), int(rows["source"][r])
        img, what = render_row(seed, p, kind, src, int(rows["cls"][r]), rows["stains"][rows["stain_ds"][r]])
        pixels.append(img)
        sha.append(images.pixel_sha256(img))
        details.append(what)
        noise_of = p if kind >= len(COPY_KINDS) else src  # a look-alike is a cell of its own
        emb[r] = centres[rows["mode"][r]] + 1.2 * np.random.default_rng([seed, 2, noise_of]).standard_normal(
            dim, np.float32)
        if 0 <= kind < len(COPY_KINDS):
            emb[r] += 0.05 * np.random.default_rng([seed, 3, p, 1]).standard_normal(dim, np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = _ids(np.arange(start, start + n))
    ds = rows["dataset"]
    names = np.array([f"ds{d:02d}" for d in range(DATASETS)], dtype=object)[ds]
    hw = np.array([im.shape[:2] for im in pixels], np.int32).reshape(-1, 2)
    cols = {"image_id": ids, "uri": [f"synthetic://{d}/{i}" for d, i in zip(names, ids.to_pylist())],
            "dataset": names, "modality": np.where(ds % 4 == 0, "bone_marrow", "peripheral_blood").astype(object),
            "cell_type": np.where(ds % 3 != 0, np.array(CLASS_NAMES, dtype=object)[rows["cls"]], None),  # a third
            "width": hw[:, 1], "height": hw[:, 0], "pixel_sha256": sha}  # of the datasets carry no labels
    ingested = pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type)
                         for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)
    embeddings = pa.table({"image_id": ids, "embedding": pack_vectors(emb), **fingerprint_columns(pixels)})
    return ingested, embeddings, details


def _write_planted_part(job) -> tuple[int, list]:
    """Render rows [start, stop) and write them as part ``index`` of both stage files; returns (rows, details)."""
    from cytoray import storage
    from cytoray.curation.shards import write_part

    out, storage_cfg, seed, dim, index, start, rows = job
    ingested, embeddings, details = _render_part(seed, dim, start, rows)
    write_part(storage.join_uri(out, "ingested.parquet"), index, ingested, storage_cfg)
    del ingested
    write_part(storage.join_uri(out, "embeddings.parquet"), index, embeddings, storage_cfg)
    return len(details), details


def _truth(plan: dict[str, np.ndarray], details: list):
    """The ground truth as an Arrow table in position order: image_id, kind (TRUTH_KINDS), duplicate_of (copies),
    lookalike_of (look-alikes), transform (the copy's kind, or twin / overlap), detail (the drawn parameters),
    cell_type (the rendered class, for every row) and dataset."""
    import pyarrow as pa

    from cytoray.curation.synthetic.cells import CLASS_NAMES

    n, k = len(plan["kind"]), plan["kind"]
    copy = (k >= 0) & (k < len(COPY_KINDS))
    look = k >= len(COPY_KINDS)
    kind = np.where(copy, np.where(k == COPY_KINDS.index("exact"), 1, 2), np.where(look, 3, 0))
    names = list(COPY_KINDS) + list(LOOKALIKE_KINDS)
    return pa.table({"image_id": _ids(np.arange(n)),
                     "kind": pa.DictionaryArray.from_arrays(pa.array(kind), list(TRUTH_KINDS)).cast(pa.string()),
                     "duplicate_of": _ids(plan["source"], copy), "lookalike_of": _ids(plan["source"], look),
                     "transform": pa.DictionaryArray.from_arrays(pa.array(np.where(k >= 0, k, 0), mask=k < 0),
                                                                 names).cast(pa.string()),
                     "detail": pa.array(details, pa.string()),
                     "cell_type": pa.DictionaryArray.from_arrays(pa.array(plan["cls"].astype(np.int64)),
                                                                 list(CLASS_NAMES)).cast(pa.string()),
                     "dataset": pa.array(plan["dataset"].astype(np.int64))})


PER_ROW = ("dataset", "stain_ds", "cls", "mode", "kind", "source")


def make_collection(n: int, dim: int, copy_rate: float, seed: int, lookalike_rate: float = 0.05):
    """(ingested table, embeddings table, ground truth frame) of ``n`` rows in image_id order, in memory."""
    plan = _plan(n, copy_rate, lookalike_rate, seed)
    ingested, embeddings, details = _render_part(seed, dim, 0, {**{k: plan[k] for k in PER_ROW},
                                                                "stains": plan["stains"]})
    return ingested, embeddings, _truth(plan, details).to_pandas()


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


def write_planted_run(out: str, n: int, dim: int = 384, copy_rate: float = 0.05, seed: int = 0, workers: int = 1,
                      part_rows: int = 16_384, storage_cfg=None, resume: bool = False, lookalike_rate: float = 0.05):
    """What ingest and embed write for ``n`` synthetic cells with planted copies and look-alikes (as
    :func:`make_collection`), in memory bounded by ``part_rows`` whatever ``n``: ``ingested.parquet/`` and
    ``embeddings.parquet/`` as directories of part files (``part_rows`` rows each, rows aligned, image ids ``c%09d``
    in generation order), rendered by ``workers`` processes; then ``truth.parquet`` and the ingest and embed markers.
    Any earlier stage markers in ``out`` are removed first. Returns the ground truth (pandas).

    Memory: the caller holds a few bytes per image plus the truth's detail strings (≈ 1 GB at 5M images); a worker
    one part, ≈ 1 GB at the default 16,384 rows (the rendered pixels and Parquet's writer on the fingerprint lists).
    Workers are spawned, so a script calling this with ``workers > 1`` needs an ``if __name__ == "__main__"`` guard.

    ``resume``: keep the parts an interrupted call with the same arguments wrote (``planted.json`` records them;
    a part counts once its embeddings file, written last and atomically, exists) and render only the rest; their
    rows' details are rendered again (cheap next to the fingerprints) for the truth."""
    import json
    from concurrent.futures import as_completed

    from cytoray import console, storage, tables
    from cytoray.curation.shards import remove
    from cytoray.curation.stage import STAGES, marker_uri, run_stage

    if n < 1 or part_rows < 1 or not 0 <= copy_rate <= 0.5 or not 0 <= lookalike_rate <= 0.25:
        raise ValueError(f"write_planted_run: n={n} and part_rows={part_rows} must be >= 1, copy_rate={copy_rate} "
                         f"in [0, 0.5], lookalike_rate={lookalike_rate} in [0, 0.25]")
    plan = _plan(n, copy_rate, lookalike_rate, seed)
    settings = {"planted": {"images": n, "dim": dim, "copy_rate": copy_rate, "lookalike_rate": lookalike_rate,
                            "seed": seed, "part_rows": part_rows, "size": SIZE}}
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

    jobs = [(out, storage_cfg, seed, dim, i, a, {**{k: plan[k][a:a + part_rows] for k in PER_ROW},
                                                 "stains": plan["stains"]})
            for i, a in enumerate(range(0, n, part_rows))]
    details: list = [None] * len(jobs)
    progress = console.Progress("planted images", n, "images")
    if resume:
        from cytoray.curation.shards import part_uri

        done = {j[4] for j in jobs if storage.exists(part_uri(storage.join_uri(out, "embeddings.parquet"), j[4]),
                                                     storage_cfg)}
        for j in jobs:
            if j[4] in done:
                rows = j[6]
                details[j[4]] = [render_row(seed, j[5] + r, int(rows["kind"][r]), int(rows["source"][r]),
                                            int(rows["cls"][r]), rows["stains"][rows["stain_ds"][r]])[1]
                                 for r in range(len(rows["kind"]))]
        progress.update(increment=sum(len(j[6]["kind"]) for j in jobs if j[4] in done))
        jobs = [j for j in jobs if j[4] not in done]
    try:
        if workers <= 1:
            for job in jobs:
                count, details[job[4]] = _write_planted_part(job)
                progress.update(increment=count)
        else:  # spawned, not forked: a worker's memory is its own part, not a copy of this process
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_write_planted_part, job): job[4] for job in jobs}
                for done_ in as_completed(futures):
                    count, details[futures[done_]] = done_.result()
                    progress.update(increment=count)
    finally:
        progress.close()
    del jobs

    truth = _truth(plan, [d for part in details for d in part])
    del plan
    tables.write_table(storage.join_uri(out, "truth.parquet"), truth, storage_cfg, sort=False)
    run_stage("ingest", out, settings, lambda run: {"stage": "ingest", "images": n}, storage_cfg, force=True)
    run_stage("embed", out, settings, lambda run: {"stage": "embed", "embedder": "synthetic", "count": n,
                                                   "dim": dim}, storage_cfg, force=True)
    return truth.to_pandas()
