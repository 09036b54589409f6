"""The manifest contract: one row per image, the columns every stage keeps, and the one validated way to read it.

A manifest is a Parquet file or directory (``tables.read_table``). Ingest writes :data:`MANIFEST_SCHEMA`; curation
adds :data:`CURATION_COLUMNS` (``cluster_l1`` ... ``cluster_lT``, ``group``, ``weight``, ``repeats``); a dropped
image is never silently lost: duplicates go to :data:`DUPLICATES_SCHEMA`, unreadable or invalid inputs to
:data:`QUARANTINE_SCHEMA`. Readers state the columns they need; :func:`read_manifest` checks them once, where the
file is read, and names the file and the fix when they are missing.

Locations: ingest writes every ``uri`` absolute (or on object storage). A hand-made manifest may hold relative
``uri`` values: :func:`read_manifest` resolves them against the folder holding the manifest, wherever the reader
runs. Pre-flight (:func:`check_images`) opens the first few images of a manifest before a job starts, so a wrong
location fails in seconds, in one line, not inside a Ray Data task.
"""

from __future__ import annotations

import posixpath

import pyarrow as pa
import pyarrow.compute as pc

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
PREFLIGHT_IMAGES = 3  # images of each manifest that pre-flight opens (the first rows: a few requests)
URI_FIX = "write absolute or object-storage uris, or keep relative uris relative to the manifest's folder"


class ManifestError(UserError):
    """A manifest that cannot be used as asked; the message names the file and the fix."""


def read_manifest(uri: str, storage_cfg: storage.StorageConfig | None = None, columns: tuple[str, ...] = (),
                  optional: tuple[str, ...] = (), purpose: str = "manifest", fix: str = "",
                  allow_empty: bool = False) -> pa.Table:
    """The manifest's ``columns`` (all required) plus those of ``optional`` it has (all columns when both are
    empty). ``purpose`` names the setting it came from in errors (e.g. ``data.manifest_uri``); ``fix`` is how to
    get a valid one."""
    from cytoray.runtime import working_dir_note

    fix = fix or "write it with recipes/curate.py or add the columns"
    try:
        schema = tables.read_schema(uri, storage_cfg)
    except (FileNotFoundError, OSError) as exc:
        if not isinstance(exc, FileNotFoundError) and _folder_without_parquet(uri, storage_cfg):
            raise ManifestError(f"{purpose} {uri!r} is a folder without Parquet files (images, class folders?), "
                                f"not a manifest; {fix}") from None
        suffix = posixpath.splitext(uri.rstrip("/"))[1].lower()
        if not isinstance(exc, FileNotFoundError) and suffix not in ("", ".parquet", ".pq") \
                and not _is_folder(uri, storage_cfg):
            # a label table (.csv) or an image: not a broken Parquet file to delete and rewrite
            raise ManifestError(f"{purpose} {uri!r} is a {suffix} file, not Parquet; {fix}") from None
        raise ManifestError(f"{purpose} {uri!r} cannot be read ({exc}){working_dir_note(uri)}; {fix}") from exc
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
    return resolve_uris(table, uri) if "uri" in table.column_names else table


def resolve_uris(table: pa.Table, manifest_uri: str) -> pa.Table:
    """``table`` with relative local ``uri`` values made absolute against the folder holding the manifest
    (``manifest_uri``, a file or a directory of parts; local or object storage); others unchanged. Costs one
    vectorised scan when every value is absolute (curated manifests)."""
    col = table.column("uri")
    relative = storage.relative_to_base_mask(col)  # a null uri stays null (pre-flight names its row)
    if not pc.any(relative).as_py():
        return table
    base = storage.parent_uri(storage.absolute(manifest_uri))
    values = [storage.absolute(u, base) if rel else u
              for u, rel in zip(col.to_pylist(), relative.to_pylist())]
    return table.set_column(table.column_names.index("uri"), "uri", pa.array(values, col.type))


def check_images(table: pa.Table, manifest_uri: str, storage_cfg: storage.StorageConfig | None = None,
                 purpose: str = "manifest", count: int = PREFLIGHT_IMAGES) -> None:
    """Pre-flight: open the first ``count`` images a manifest (read by :func:`read_manifest`) names; one line
    naming the manifest, the uri and the fix when one cannot be opened."""
    from cytoray.runtime import working_dir_note

    for row, image_uri in enumerate(table.column("uri").slice(0, count).to_pylist()):
        if not image_uri:
            raise ManifestError(f"{purpose} {manifest_uri!r}: row {row} has no uri; every row names its image")
        try:
            storage.read_head(image_uri, storage_cfg)
        except (OSError, ValueError) as exc:
            detail = (str(exc).strip().splitlines() or [""])[0]  # one line, whatever the storage layer said
            reason = "not found" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {detail}"[:200]
            raise ManifestError(f"{purpose} {manifest_uri!r}: image uri {image_uri!r} (row {row}) cannot be opened "
                                f"({reason}){working_dir_note(image_uri)}; {URI_FIX}") from None


def _is_folder(uri: str, storage_cfg=None) -> bool:
    fs, path = storage.filesystem(uri, storage_cfg)
    try:
        return bool(fs.isdir(path))
    except OSError:
        return False


def _folder_without_parquet(uri: str, storage_cfg=None, limit: int = 1000) -> bool:
    """Is ``uri`` a folder in which no ``.parquet`` file turns up among its first ``limit`` entries?"""
    fs, path = storage.filesystem(uri, storage_cfg)
    try:
        if not fs.isdir(path):
            return False
        seen = 0
        for _, dirs, files in fs.walk(path):
            if any(f.endswith(".parquet") for f in files):
                return False
            seen += len(dirs) + len(files)
            if seen >= limit:
                break
    except OSError:
        return False
    return True


def cluster_columns(names: list[str]) -> list[str]:
    """The ``cluster_l<t>`` columns of a curated manifest, coarse to fine by level number."""
    found = [c for c in names if c.startswith(CLUSTER_COLUMN_PREFIX) and c[len(CLUSTER_COLUMN_PREFIX):].isdigit()]
    return sorted(found, key=lambda c: int(c[len(CLUSTER_COLUMN_PREFIX):]))
