"""Parquet IO: the one read path and the one write path every stage, stream and probe uses.

- :func:`read_table` reads a Parquet file or a directory of Parquet files (a multi-file dataset) from any URI,
  retrying transient object-storage errors (``storage.with_retries``). A file pyarrow cannot parse (truncated, not
  Parquet, or sized wrong by the storage) raises a one-line ``StorageError`` naming it (:func:`parquet_errors`).
- :func:`write_table` publishes a table atomically: a temp name then rename on local disk, one PUT on object
  storage (readers see the old object or the new one, never a part), with the same retries. Rows are sorted by
  the first column by default, so the same content gives the same file.
- :func:`pack_vectors` / :func:`unpack_vectors`: (N, D) arrays <-> a ``FixedSizeList`` column (embeddings,
  features, fingerprints).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cytoray import storage
from cytoray.errors import StorageError

# Rows per Parquet row group: a reader of a row range (``curation.shards.read_rows``) reads only the groups it
# touches, so a large single-file stage output can still be read shard by shard.
ROW_GROUP_ROWS = 16_384


def _locate(uri: str, storage_cfg):
    """(arrow filesystem, path, is a directory) of an existing file or directory; FileNotFoundError otherwise."""
    import pyarrow.fs as pafs

    fs, path = storage.arrow_filesystem(uri, storage_cfg)
    info = storage.with_retries(lambda: fs.get_file_info(path), storage_cfg, f"stat {uri}")
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    return fs, path, info.type == pafs.FileType.Directory


def uri_of(uri: str, path: str) -> str:
    """The URI of ``path``, a path inside ``uri``'s filesystem (object stores give "bucket/key")."""
    protocol = storage.split_protocol(uri)[0]
    return path if protocol == "file" else f"{protocol}://{path}"


@contextlib.contextmanager
def parquet_errors(uri: str) -> Iterator[None]:
    """Turn pyarrow's failure to parse the Parquet file ``uri`` (``ArrowInvalid``, or ``ArrowIOError``, which is
    ``OSError`` itself) into a one-line :class:`StorageError` that names the file and the fix."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as exc:
        # OSError's subclasses (FileNotFoundError, StorageError after the retries, ...) say what happened already;
        # a column the caller asked for and the file lacks is not the file's fault
        if type(exc) is OSError or (isinstance(exc, pa.ArrowInvalid) and "No match for FieldRef" not in str(exc)):
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            raise StorageError(f"cannot read Parquet file {uri} ({type(exc).__name__}: {detail}): it is truncated "
                               "or not Parquet, or the storage reports a wrong size for it; delete it and rerun the "
                               "stage that writes it (force=true)") from exc
        raise


def read_table(uri: str, storage_cfg: storage.StorageConfig | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """A Parquet file or directory as one pyarrow Table; FileNotFoundError when neither exists."""
    fs, path, is_dir = _locate(uri, storage_cfg)
    with parquet_errors(uri):
        if is_dir:
            return storage.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=columns), storage_cfg,
                                        f"read {uri}")
        # One file: read whole, then parse (one ranged GET instead of many small ones on object storage).
        return pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_cfg)), columns=columns)


def read_schema(uri: str, storage_cfg: storage.StorageConfig | None = None) -> pa.Schema:
    """The schema of a Parquet file or directory without reading its rows."""
    fs, path, is_dir = _locate(uri, storage_cfg)
    with parquet_errors(uri):
        if is_dir:
            return storage.with_retries(lambda: pq.ParquetDataset(path, filesystem=fs).schema, storage_cfg,
                                        f"read schema {uri}")
        return storage.with_retries(lambda: pq.read_schema(path, filesystem=fs), storage_cfg, f"read schema {uri}")


def to_parquet_bytes(table: pa.Table, sort: bool = True) -> bytes:
    table = table.sort_by(table.column_names[0]) if sort and table.num_rows else table
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    return buf.getvalue().to_pybytes()


def write_table(uri: str, table: pa.Table, storage_cfg: storage.StorageConfig | None = None,
                sort: bool = True) -> None:
    """Publish ``table`` at ``uri`` atomically (see the module docstring); ``sort``: by the first column."""
    storage.write_bytes(uri, to_parquet_bytes(table, sort), storage_cfg)


def pack_vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) array -> FixedSizeList<D> column of its dtype."""
    x = np.ascontiguousarray(x)
    n = x.shape[0]
    d = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(n * d)), d)


def unpack_vectors(column, dtype=np.float32) -> np.ndarray:
    """A FixedSizeList (or equal-length list) column -> (N, D) array of ``dtype``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    if pa.types.is_fixed_size_list(column.type):
        values = column.flatten()
    else:
        values = pa.concat_arrays([column.flatten()]) if n else pa.array([], pa.float32())
    flat = np.asarray(values.to_numpy(zero_copy_only=False), dtype)
    return flat.reshape(n, -1) if n else flat.reshape(0, column.type.list_size if
                                                     pa.types.is_fixed_size_list(column.type) else 0)
