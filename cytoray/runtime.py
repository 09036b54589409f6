"""Process set-up shared by recipes: logging and connecting to (or starting) Ray."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass


@dataclass
class RayConfig:
    """How a recipe reaches Ray. Under `ray job submit` the job's cluster is used whatever is set here."""

    address: str | None = None  # None: RAY_ADDRESS if set (ray job submit sets it), else a local instance
    num_cpus: int | None = None  # local instance only; None = all cores
    # Local instance only. Ray's dashboard serves the progress UI (127.0.0.1:8265) and the state API that Ray
    # Train's placement-group cleaner polls: without it the cleaner logs a warning every few seconds and a
    # crashed training controller's placement group is never reclaimed. Costs ~0.9 GiB of memory.
    include_dashboard: bool = True


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned: bool | None = None


def keep_image_buffers_on_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Serve image-sized allocations (decoded pixels, 0.1-30 MB) from the heap in this process; glibc only.

    glibc normally raises its mmap threshold the first time such a buffer is freed, so a ``multiprocessing``
    process reuses heap memory. In Ray worker processes the threshold can stay at 128 KiB, and then every
    decoded image's buffers are mmap'ed and unmapped afresh -- ~110 page faults per image, ~27% more CPU,
    mostly in the kernel (measured: benchmarks/RESULTS.md). The values set here are what that adaptation would
    reach (its 32 MiB ceiling on 64-bit; trim at twice that), so a process keeps at most ~64 MiB of freed
    memory for reuse. Called by the decode callables on first use; idempotent; returns
    whether the settings were applied (False off glibc).
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        _malloc_tuned = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _malloc_tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
            pass
    return _malloc_tuned


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def init_ray(cfg: RayConfig | None = None):
    """Connect to the configured cluster or start a local one; a no-op when Ray is already up."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=cfg.include_dashboard)
    logging.getLogger(__name__).info("ray resources: %s", ray.cluster_resources())
    return ray


@contextlib.contextmanager
def data_context(**settings):
    """Set Ray Data context fields for one execution, restoring them afterwards."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    try:
        yield ctx
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


@contextlib.contextmanager
def environment(**variables: str):
    """Set environment variables for the duration of a block, restoring (or removing) them afterwards."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def working_dir_note(uri: str) -> str:
    """Under ``ray job submit --working-dir``, the job runs in Ray's uploaded copy of that folder, which holds no
    git-ignored folders (``runs/``, data): for a local ``uri`` inside that copy, a sentence saying so and what to
    pass instead (to append to a "not found" message); otherwise "". Ray names the job's working dir in
    ``RAY_JOB_CONFIG_JSON_ENV_VAR``; a ``local://`` one is used in place, not copied."""
    import json

    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return ""
    working_dir = ((job.get("runtime_env") or {}).get("working_dir") or "") if isinstance(job, dict) else ""
    cwd = os.getcwd().rstrip("/") + "/"
    if not working_dir or working_dir.startswith("local://") or "://" in uri or not uri.startswith(cwd):
        return ""
    return (f" (this ray job runs in Ray's copy of --working-dir, {cwd.rstrip('/')}, which has no git-ignored "
            "folders such as runs/: pass absolute paths that exist on every node, or object-storage URIs)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (process-group rendezvous, local test servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
