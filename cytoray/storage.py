"""One place that turns a URI into a filesystem, for Ray Data and for plain code, with bounded retries.

A URI is a local path, ``file://...``, ``s3://bucket/key`` or any other fsspec scheme (``gs://``, ``az://``
...). Endpoint and region come from :class:`StorageConfig` or the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` ...); credentials are never logged and never
written to run directories (see :func:`redact`).

Transient object-storage errors (timeouts, connection resets, HTTP 5xx, throttling) are retried twice
over: botocore retries each HTTP request (``standard`` mode, ``max_attempts``), and :func:`with_retries`
retries whole operations that fail mid-stream, with capped exponential backoff and jitter.
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Config keys whose values never leave the process (config dumps, logs, summaries).
SECRET_KEYS = {"key", "secret", "token", "password", "access_key_id", "secret_access_key", "session_token"}
SECRET_SUFFIXES = ("_secret", "_token", "_password", "_key_id", "_access_key")


@dataclass
class StorageConfig:
    """Object-storage settings; every field may stay empty and fall back to the AWS environment."""

    endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO / moto; AWS_ENDPOINT_URL otherwise
    region: str | None = None  # AWS_REGION / AWS_DEFAULT_REGION otherwise
    anon: bool = False  # unsigned requests, for public buckets
    access_key_id: str | None = None  # prefer the environment; if set here it is redacted from dumps
    secret_access_key: str | None = None
    session_token: str | None = None
    max_attempts: int = 8  # per HTTP request (botocore) and per operation (with_retries)
    base_delay_s: float = 0.05  # first backoff; doubles per attempt
    max_delay_s: float = 2.0  # backoff cap
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


def split_protocol(uri: str) -> tuple[str, str]:
    """``s3://b/k`` -> ("s3", "b/k"); ``/x`` or ``file:///x`` -> ("file", "/x")."""
    if "://" not in uri:
        return "file", os.path.abspath(os.path.expanduser(uri))
    protocol, path = uri.split("://", 1)
    if protocol in ("file", "local"):
        return "file", os.path.abspath(path)
    return protocol, path


# A Windows drive or UNC path (``C:\\x``, ``C:/x``, ``\\\\host\\share``): not openable here, and not relative either;
# left as written so that an error names it as the user wrote it
WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")
_LOCAL_SCHEMES = ("file", "local")


def is_relative_path(uri: str) -> bool:
    """A local path that is not absolute: no scheme (``s3://``, ``file://`` ...), no leading ``/`` or ``~``, not
    a Windows drive or UNC path."""
    return bool(uri) and "://" not in uri and not uri.startswith(("/", "~")) and not WINDOWS_PATH.match(uri)


def relative_to_base(uri: str) -> bool:
    """Whether :func:`absolute` resolves ``uri`` against a base folder: a relative local path, or a relative
    ``file://`` / ``local://`` path (``~`` expands against the home folder instead)."""
    protocol, sep, rest = uri.partition("://")
    if sep:
        return protocol in _LOCAL_SCHEMES and bool(rest) and not rest.startswith("/")
    return is_relative_path(uri)


def relative_to_base_mask(values):
    """:func:`relative_to_base` over a pyarrow string array in one vectorised scan (false for nulls); the same
    rule, kept beside it (tests/test_locations.py checks both agree)."""
    import pyarrow.compute as pc

    scheme = pc.match_substring(values, "://")
    local_relative = pc.match_substring_regex(values, "^(?:" + "|".join(_LOCAL_SCHEMES) + ")://[^/]")
    plain_relative = pc.invert(pc.or_(pc.or_(pc.starts_with(values, "/"), pc.starts_with(values, "~")),
                                      pc.match_substring_regex(values, WINDOWS_PATH.pattern)))
    plain_relative = pc.and_(plain_relative, pc.greater(pc.utf8_length(values), 0))
    return pc.fill_null(pc.if_else(scheme, local_relative, plain_relative), False)


def absolute(uri: str, base: str | None = None) -> str:
    """``uri`` with a relative local path made absolute against ``base`` (a local folder or an object-storage URI;
    default: the working directory) and ``~`` expanded (a relative ``file://`` / ``local://`` path likewise, keeping
    its scheme); object-storage URIs, absolute paths and Windows paths come back unchanged. Relative paths are resolved where they are read (a config at load, a manifest's ``uri``
    values against the manifest's folder), so a later process elsewhere, e.g. a ``ray job submit`` working-dir
    copy or a Ray worker, finds the same file."""
    if uri.startswith("~"):
        return os.path.expanduser(uri)
    protocol, sep, rest = uri.partition("://")
    if sep and protocol in _LOCAL_SCHEMES and rest and not rest.startswith("/"):
        # file://runs/x: split_protocol reads it against the working directory of whichever process opens it.
        # Against a local base only (a local path is never made an object-storage one)
        if base is not None and "://" in base and base.split("://", 1)[0] not in _LOCAL_SCHEMES:
            return uri
        return f"{protocol}://{split_protocol(absolute(rest, base))[1]}"
    if not is_relative_path(uri):
        return uri
    if base is None or "://" not in base:
        return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(base or ".")), uri))
    protocol, path = base.split("://", 1)
    return f"{protocol}://{posixpath.normpath(posixpath.join(path, uri))}"


def parent_uri(uri: str) -> str:
    """The folder holding ``uri`` (a file, or a directory such as a multi-file Parquet dataset)."""
    if "://" not in uri:
        return os.path.dirname(os.path.abspath(os.path.expanduser(uri.rstrip("/") or "/")))
    protocol, path = uri.split("://", 1)
    return f"{protocol}://{posixpath.dirname(path.rstrip('/'))}"


def join_uri(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _s3_options(cfg: StorageConfig) -> dict:
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = cfg.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    opts: dict = {
        "anon": cfg.anon,
        # botocore's standard retry mode retries 5xx, throttling codes and connection errors per request.
        "config_kwargs": {
            "retries": {"max_attempts": cfg.max_attempts, "mode": "standard"},
            "connect_timeout": cfg.connect_timeout_s,
            "read_timeout": cfg.read_timeout_s,
        },
        "client_kwargs": {},
    }
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region:
        opts["client_kwargs"]["region_name"] = region
    if cfg.access_key_id:
        opts["key"] = cfg.access_key_id
        opts["secret"] = cfg.secret_access_key
        if cfg.session_token:
            opts["token"] = cfg.session_token
    return opts


def filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``uri`` to an fsspec filesystem and the path inside it."""
    cfg = cfg or StorageConfig()
    protocol, path = split_protocol(uri)
    if protocol == "file":
        return fsspec.filesystem("file"), path
    if protocol in ("s3", "s3a"):
        return fsspec.filesystem("s3", **_s3_options(cfg)), path
    try:
        return fsspec.filesystem(protocol), path
    except (ImportError, ValueError) as exc:
        raise ValueError(
            f"no filesystem for URI scheme '{protocol}://' in {uri!r}: install the fsspec backend for it "
            f"(e.g. gcsfs for gs://, adlfs for az://) or use a local path / s3:// URI"
        ) from exc


def arrow_filesystem(uri: str, cfg: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """The same filesystem wrapped for pyarrow / Ray Data (``filesystem=`` arguments)."""
    fs, path = filesystem(uri, cfg)
    if split_protocol(uri)[0] == "file":
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: timeouts, dropped connections, HTTP 5xx, throttling."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (TimeoutError, ConnectionError)):
            return True
        name = type(exc).__name__
        if name in {
            "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
            "IncompleteReadError", "ResponseStreamingError", "ServerDisconnectedError",
            "ClientPayloadError", "ClientConnectionError", "ClientOSError",
        }:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in {
                "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                "ServiceUnavailable", "RequestLimitExceeded",
            }:
                return True
        text = str(exc)
        if any(s in text for s in ("503", "SlowDown", "InternalError", "Service Unavailable", "timed out")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def with_retries(fn: Callable[[], T], cfg: StorageConfig | None = None, what: str = "operation") -> T:
    """Run ``fn``; retry transient failures with capped exponential backoff. Others raise at once; a transient
    failure that outlasts ``max_attempts`` raises :class:`~cytoray.errors.StorageError` naming the operation, the
    endpoint and the setting."""
    from cytoray.errors import StorageError

    cfg = cfg or StorageConfig()
    for attempt in range(1, cfg.max_attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == cfg.max_attempts:
                endpoint = _s3_options(cfg).get("endpoint_url", "the default endpoint")
                raise StorageError(
                    f"{what} failed {attempt} times ({type(exc).__name__}: {str(exc)[:200]}) at {endpoint}; check "
                    f"the endpoint and credentials (storage.endpoint_url, AWS_* variables) or allow more attempts "
                    f"(storage.max_attempts={cfg.max_attempts})") from exc
            delay = min(cfg.max_delay_s, cfg.base_delay_s * 2 ** (attempt - 1)) * (0.5 + random.random())
            log.warning("transient error on %s (attempt %d/%d): %s; retrying in %.2fs",
                        what, attempt, cfg.max_attempts, type(exc).__name__, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(uri: str, cfg: StorageConfig | None = None) -> bytes:
    protocol, path = split_protocol(uri)
    if protocol == "file":  # plain open(): fsspec's local file wrapper costs more than the read itself
        with open(path, "rb") as fh:
            return fh.read()
    fs, path = filesystem(uri, cfg)
    return with_retries(lambda: fs.cat_file(path), cfg, what=f"read {uri}")


def read_head(uri: str, cfg: StorageConfig | None = None, size: int = 16) -> bytes:
    """The first ``size`` bytes of ``uri``: opens the object as a reader would (a cheap existence and access
    check; a directory raises ``IsADirectoryError``)."""
    protocol, path = split_protocol(uri)
    if protocol == "file":
        with open(path, "rb") as fh:
            return fh.read(size)
    fs, path = filesystem(uri, cfg)

    def head() -> bytes:
        with fs.open(path, "rb") as fh:
            return fh.read(size)

    return with_retries(head, cfg, what=f"read {uri}")


def write_bytes(uri: str, data: bytes, cfg: StorageConfig | None = None) -> None:
    """Write atomically where the filesystem allows: temp name, then rename (local) or single PUT (S3)."""
    fs, path = filesystem(uri, cfg)
    if split_protocol(uri)[0] == "file":
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}-{random.randrange(1 << 30)}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    # Object stores commit a PUT atomically: readers see the old object or the new one, never a part.
    with_retries(lambda: fs.pipe_file(path, data), cfg, what=f"write {uri}")


def exists(uri: str, cfg: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, cfg)
    return with_retries(lambda: fs.exists(path), cfg, what=f"stat {uri}")


def is_secret_key(name: str) -> bool:
    name = name.lower()
    return name in SECRET_KEYS or name.endswith(SECRET_SUFFIXES)


def redact(obj):
    """Copy of a plain dict/list tree with secret-looking values replaced by '***'."""
    if isinstance(obj, dict):
        return {
            k: ("***" if v is not None and is_secret_key(str(k)) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
