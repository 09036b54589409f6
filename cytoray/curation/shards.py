"""Stage files at scale: row-range shards of a Parquet dataset, and one function run over them either in this
process or as Ray tasks.

Dedup, cluster and balance read their inputs shard by shard (:func:`read_rows`: only the row groups a range
touches) and hand each shard to :func:`map_shards`. With ``scale.mode`` ``ray`` (or ``auto`` above
``scale.ray_above`` images) every shard is a Ray task and the driver keeps only what the tasks return (edges,
counts, ids); with ``local`` the same function runs here, shard after shard. Both paths run the same code on the
same shards, so they give the same result; the Ray path's driver memory does not grow with the rows' payload.

A stage file is a Parquet file or a directory of Parquet files (a multi-file dataset, files in name order).
Large outputs are written as directories, one file per shard (:func:`write_parts`), with row groups of at most
``ROW_GROUP_ROWS`` rows so that a later shard reads only the groups it needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cytoray import storage
from cytoray.tables import to_parquet_bytes

log = logging.getLogger(__name__)

MODES = ("auto", "local", "ray")


@dataclass
class ScaleConfig:
    """Where ingest's commit, dedup, cluster and balance run (docs/curation.md, "Ingest" and "Scale")."""

    mode: str = "auto"  # auto | local | ray
    ray_above: int = 200_000  # auto: Ray tasks above this many images, this process below
    shard_rows: int = 32_768  # rows per shard (one Ray task reads one shard: 100 MB of fingerprints)
    num_cpus: float = 0.5  # per Ray task; fractional so that tasks and the driver share small machines
    max_in_flight: int = 8  # Ray tasks submitted at once (bounds what is held in the object store)


def use_ray(cfg: ScaleConfig, rows: int) -> bool:
    if cfg.mode not in MODES:
        raise ValueError(f"curation scale.mode={cfg.mode!r}: choose one of {list(MODES)}")
    if cfg.shard_rows < 1:
        raise ValueError(f"curation scale.shard_rows={cfg.shard_rows} must be >= 1")
    return cfg.mode == "ray" or (cfg.mode == "auto" and rows > cfg.ray_above)


@dataclass(frozen=True)
class Layout:
    """Where the rows of a Parquet file or directory live: per row group (file, group, first row, rows)."""

    uri: str
    files: tuple[str, ...]
    groups: tuple[tuple[int, int, int, int], ...]  # (file index, row group, first global row, rows)
    rows: int
    schema: pa.Schema

    def ranges(self, shard_rows: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of at most ``shard_rows`` rows covering every row in order."""
        return [(a, min(self.rows, a + shard_rows)) for a in range(0, self.rows, shard_rows)] or [(0, 0)]


def _parquet_files(fs, path: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and not i.base_name.startswith(("_", ".")))


def layout(uri: str, storage_cfg: storage.StorageConfig | None = None) -> Layout:
    """The :class:`Layout` of a stage file (reads footers only); FileNotFoundError when it does not exist."""
    from cytoray.tables import _locate, parquet_errors, uri_of

    fs, path, is_dir = _locate(uri, storage_cfg)
    paths = storage.with_retries(lambda: _parquet_files(fs, path), storage_cfg, f"list {uri}") if is_dir else [path]
    if not paths:
        raise FileNotFoundError(f"{uri} is a directory without Parquet files")
    files, groups, start, schema = [], [], 0, None
    for f, p in enumerate(paths):
        with parquet_errors(uri_of(uri, p)):
            meta = storage.with_retries(lambda p=p: pq.read_metadata(p, filesystem=fs), storage_cfg,
                                        f"read footer {p}")
        schema = schema or meta.schema.to_arrow_schema()
        files.append(p)
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            groups.append((f, g, start, n))
            start += n
    return Layout(uri, tuple(files), tuple(groups), start, schema)


def read_rows(lay: Layout, start: int, stop: int, columns: Sequence[str] | None = None,
              storage_cfg: storage.StorageConfig | None = None) -> pa.Table:
    """Rows [start, stop) of a stage file in its order, reading only the row groups they fall in."""
    from cytoray.tables import parquet_errors, uri_of

    fs, _ = storage.arrow_filesystem(lay.uri, storage_cfg)
    cols = list(columns) if columns is not None else None
    parts = []
    for f, g, first, n in lay.groups:
        if first + n <= start or first >= stop or n == 0:
            continue
        with parquet_errors(uri_of(lay.uri, lay.files[f])):
            t = storage.with_retries(lambda f=f, g=g: pq.ParquetFile(lay.files[f], filesystem=fs).read_row_group(
                g, columns=cols), storage_cfg, f"read {lay.files[f]} row group {g}")
        a, b = max(start, first) - first, min(stop, first + n) - first
        parts.append(t.slice(a, b - a))
    if not parts:
        return lay.schema.empty_table().select(cols) if cols else lay.schema.empty_table()
    return pa.concat_tables(parts)


def remove(uri: str, storage_cfg: storage.StorageConfig | None = None) -> None:
    """Delete a stage file or directory if it exists."""
    fs, path = storage.filesystem(uri, storage_cfg)
    if storage.with_retries(lambda: fs.exists(path), storage_cfg, f"stat {uri}"):
        storage.with_retries(lambda: fs.rm(path, recursive=True), storage_cfg, f"remove {uri}")


def part_uri(uri: str, index: int) -> str:
    return storage.join_uri(uri, f"part-{index:05d}.parquet")


def write_part(uri: str, index: int, table: pa.Table, storage_cfg: storage.StorageConfig | None = None) -> None:
    """One file of a multi-file stage output (rows as given), atomically, row groups of ``ROW_GROUP_ROWS``."""
    storage.write_bytes(part_uri(uri, index), to_parquet_bytes(table, sort=False), storage_cfg)


def task_slots(cfg: ScaleConfig, ray_tasks: bool) -> int:
    """How many of ``map_shards``' tasks run at once: the cluster's CPUs over ``cfg.num_cpus`` each, at most
    ``cfg.max_in_flight`` (1 in this process)."""
    if not ray_tasks:
        return 1
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, min(cfg.max_in_flight, int(cpus / cfg.num_cpus + 1e-9)))


def balanced_groups(n: int, most: int, slots: int, least: int = 256) -> np.ndarray:
    """Group of each of ``n`` ordered items, in contiguous groups of at most ``most`` items, their number a multiple
    of ``slots`` (tasks running at once) as far as groups keep at least ``least`` items, and their sizes within one
    of each other: a last wave with fewer tasks than slots leaves CPUs idle while it runs (5 groups on 4 slots
    take 3 / 2.5 of the time of 8 smaller ones)."""
    if most < 1:
        raise ValueError(f"group size {most} must be >= 1")
    if not n:
        return np.zeros(0, np.int64)
    groups = -(-n // most)
    groups = max(groups, min(-(-groups // slots) * slots, n // max(least, 1)))
    return (np.arange(n) * groups) // n


def map_shards(fn: Callable, shards: Sequence, *args, ray_tasks: bool, cfg: ScaleConfig | None = None,
               desc: str = "shards", rows: Callable[[object], int] | None = None, unit: str = "images") -> list:
    """``[fn(shard, *args) for shard in shards]``, in order: in this process, or as Ray tasks (``ray_tasks``;
    ``args`` are put in the object store once, at most ``cfg.max_in_flight`` tasks at a time). Progress is
    shown per finished shard (``rows(shard)`` of ``unit`` each)."""
    from cytoray import console

    cfg = cfg or ScaleConfig()
    total = sum(rows(s) for s in shards) if rows else len(shards)
    progress = console.Progress(desc, total, unit if rows else "shards")
    out: list = [None] * len(shards)
    t0 = time.time()
    try:
        if not ray_tasks:
            for i, s in enumerate(shards):
                out[i] = fn(s, *args)
                progress.update(increment=rows(s) if rows else 1)
            return out
        import ray

        remote = ray.remote(num_cpus=cfg.num_cpus, max_retries=2)(fn)
        refs_args = [ray.put(a) for a in args]
        pending: dict = {}
        todo = list(enumerate(shards))
        while todo or pending:
            while todo and len(pending) < max(1, cfg.max_in_flight):
                i, s = todo.pop(0)
                pending[remote.remote(s, *refs_args)] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                out[i] = ray.get(ref)
                progress.update(increment=rows(shards[i]) if rows else 1)
        return out
    finally:
        progress.close()
        log.info("%s: %d shards in %.1fs (%s)", desc, len(shards), time.time() - t0,
                 "Ray tasks" if ray_tasks else "this process")


KEPT_MASK = "kept_rows.npy"  # dedup -> cluster, balance: one bit per row of ingested/embeddings.parquet, 1 = kept


def publish_mask(run, name: str, mask) -> None:
    """A boolean row mask as a packed-bit ``.npy`` (N/8 bytes) in the run directory."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.packbits(np.asarray(mask, bool)))
    run.publish_bytes(name, buf.getvalue())
    run.publish_bytes(name + ".rows", str(len(mask)).encode())


def load_mask(out_uri: str, name: str = KEPT_MASK, storage_cfg: storage.StorageConfig | None = None):
    """The boolean mask :func:`publish_mask` wrote."""
    import io

    import numpy as np

    bits = np.load(io.BytesIO(storage.read_bytes(storage.join_uri(out_uri, name), storage_cfg)))
    n = int(storage.read_bytes(storage.join_uri(out_uri, name + ".rows"), storage_cfg))
    return np.unpackbits(bits, count=n).astype(bool)
