"""The manifest contract: one row per image, the columns every stage keeps, and the one validated way to read it.

A manifest is a Parquet file or directory (``tables.read_table``). Ingest writes :data:`MANIFEST_SCHEMA`; curation
adds :data:`CURATION_COLUMNS` (``cluster_l1`` ... ``cluster_lT``, ``group``, ``weight``, ``repeats``); a dropped
image is never silently lost: duplicates go to :data:`DUPLICATES_SCHEMA`, unreadable or invalid inputs to
:data:`QUARANTINE_SCHEMA`. Readers state the columns they need; :func:`read_manifest` checks them once, where the
file is read, and names the file and the fix when they are missing.
"""

from __future__ import annotations

import pyarrow as pa

from cytoray import storage, tables
from cytoray.errors import UserError

MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.string()),  # stable and unique: <dataset>/<relative path>[#<cell index>]
    ("uri", pa.string()),  # where the image bytes live
    ("dataset", pa.string()), ("modality", pa.string()),  # peripheral_blood | bone_marrow
    ("source_label", pa.string()),  # the dataset's own label or null
    ("cell_type", pa.string()),  # unified taxonomy (curation/taxonomy.py) or null
    ("patient_id", pa.string()), ("patient_label", pa.string()),  # null when unknown
    ("width", pa.int32()), ("height", pa.int32()),
    ("content_sha256", pa.string()),  # of the stored bytes at `uri`
    ("pixel_sha256", pa.string()),  # of the decoded RGB pixels (exact-duplicate key)
    ("source_uri", pa.string()),  # the input file (differs from uri for crops)
    ("crop_box", pa.list_(pa.int32())), ("split", pa.string()), ("format", pa.string()),
    ("num_frames", pa.int32()), ("num_bytes", pa.int64()),
])
CURATION_COLUMNS = pa.schema([  # added by cluster + balance (one cluster_l<t> per hierarchy level)
    ("group", pa.string()), ("weight", pa.float32()), ("repeats", pa.int32()),
])
CLUSTER_COLUMN_PREFIX = "cluster_l"
QUARANTINE_SCHEMA = pa.schema([("uri", pa.string()), ("dataset", pa.string()), ("reason", pa.string()),
                               ("detail", pa.string())])
# similarity: the verified score of the pair (curation.verification; 1.0 for exact copies); transform: how the removed
# image relates to the one it duplicates ("identical pixels", "flip horizontal; box x 0.94 y 1.00 of the other's, ...")
DUPLICATES_SCHEMA = pa.schema([("image_id", pa.string()), ("duplicate_of", pa.string()),
                               ("similarity", pa.float32()), ("reason", pa.string()),  # exact | near_duplicate | leakage
                               ("dataset", pa.string()), ("duplicate_of_dataset", pa.string()),
                               ("transform", pa.string())])
SAMPLING_COLUMNS = ("repeats", "weight")  # how often a row is seen per epoch (see platform.data.stream)


class ManifestError(UserError):
    """A manifest that cannot be used as asked; the message names the file and the fix."""


def read_manifest(uri: str, storage_cfg: storage.StorageConfig | None = None, columns: tuple[str, ...] = (),
                  optional: tuple[str, ...] = (), purpose: str = "manifest", fix: str = "",
                  allow_empty: bool = False) -> pa.Table:
    """The manifest's ``columns`` (all required) plus those of ``optional`` it has (all columns when both are
    empty). ``purpose`` names the setting it came from in errors (e.g. ``data.manifest_uri``); ``fix`` is how to
    get a valid one."""
    fix = fix or "write it with recipes/curate.py or add the columns"
    try:
        schema = tables.read_schema(uri, storage_cfg)
    except (FileNotFoundError, OSError) as exc:
        raise ManifestError(f"{purpose} {uri!r} cannot be read ({exc}); {fix}") from exc
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ManifestError(f"{purpose} {uri!r} lacks column(s) {missing} (has {schema.names}); it needs "
                            f"{list(columns)}: {fix}")
    wanted = None
    if columns or optional:
        wanted = list(columns) + [c for c in optional if c in schema.names and c not in columns]
    table = tables.read_table(uri, storage_cfg, wanted)
    if table.num_rows == 0 and not allow_empty:
        raise ManifestError(f"{purpose} {uri!r} has no rows")
    return table


def cluster_columns(names: list[str]) -> list[str]:
    """The ``cluster_l<t>`` columns of a curated manifest, coarse to fine by level number."""
    found = [c for c in names if c.startswith(CLUSTER_COLUMN_PREFIX) and c[len(CLUSTER_COLUMN_PREFIX):].isdigit()]
    return sorted(found, key=lambda c: int(c[len(CLUSTER_COLUMN_PREFIX):]))
