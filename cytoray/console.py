"""What a person sees while a recipe runs, and the run log that keeps everything else.

A recipe runs inside :func:`capture`: the process's stdout and stderr (file descriptors 1 and 2, so Python
prints, every logging handler, Ray's forwarded worker output and C++ log lines alike) are read line by line.
Every line goes to the run log, ``<run dir>/logs/<recipe>_<time>.log`` (:func:`log_to` names the directory
once the recipe knows it; until then a temporary file holds the lines). The terminal shows:

- lines said with :func:`say` (stage summaries, tables, paths);
- lines that workers print with the ``[cytoray] `` marker (training progress, per-checkpoint probe scores),
  without Ray's ``(RayTrainWorker pid=…)`` prefix;
- warnings and errors, except the known-harmless ones in :data:`HARMLESS`;
- progress of long stages: a bar on a terminal, otherwise a line every ``CYTORAY_PROGRESS_S`` seconds (10).

Everything else — Ray's per-report dicts, Ray Data's execution plans and progress dumps, INFO logging — is in
the log. ``--verbose`` (or ``CYTORAY_VERBOSE=1``) shows every line as well. Outside :func:`capture` (a
notebook, a test calling a recipe's ``main``) nothing is redirected and :func:`say` is ``print``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from cytoray import errors

MARKER = "[cytoray] "
SAID = "\x1e"  # ASCII record separator: starts each line of say() in the pipe
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Ray's prefix on forwarded worker lines, e.g. "(RayTrainWorker pid=6832, ip=10.0.0.2) "
WORKER_PREFIX = re.compile(r"^\((?P<who>[^()]*?)(?: pid=\d+)?(?:, ip=[^)]*)?\) ")
RAY_DEDUP = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
PROBLEM = re.compile(r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b|\w*(Warning|Error|Exception)\b|Traceback"
                     r"|^\[[^\]]* [EWF] \d+ \d+\]|^[EWF]\d{4} ")
# Warnings this project's set-up triggers on purpose or that Ray prints for its own internals; kept in the log.
HARMLESS = [re.compile(p) for p in (
    r"has constructor arguments in the object store and max_restarts > 0",  # every Ray Data actor pool (2.60)
    r"Ray cluster currently does not have any available CPUs",  # fractional-CPU actors of the previous stage
    r"Progress bars disabled\. To enable",  # the training stream turns Ray Data's bars off on purpose
    r"Progress bars for operators disabled",
    r"Could not load library with AVX2 support",  # faiss's loader tries AVX2 first
    r"No module named 'faiss\.swigfaiss_avx",
    r"FutureWarning: .*ray\.tune",
    r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
    r"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
    r"Ray Train V2 .* deprecated",
    # step.py filters it around the forward, but Ray Train runs the loop in a thread and warnings filters are
    # process-wide; nothing writes into those views in place (see step.py)
    r"FSDP2-wrapped module \(.*\) returned a view tensor",
)]

_active: Console | None = None


def run_recipe(main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Run a recipe's ``main(argv)`` with its output filtered into a run log; a user error becomes one line on
    stderr and exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CYTORAY_DEBUG", "") not in ("", "0")
    verbose = True if "--verbose" in argv else None
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    try:
        with capture(verbose=verbose):
            main(argv)
    except Exception as exc:
        found = errors.find_user_error(exc)
        if found is None or debug:
            raise
        print(f"cytoray: error: {found}".replace("\n", " "), file=sys.stderr)
        print("cytoray: (rerun with --debug or CYTORAY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


def say(message: str = "") -> None:
    """A line for the person running the recipe (and the run log)."""
    if _active is None:
        print(message, flush=True)
    else:
        _active.say(message)


def log_to(run_dir: str, storage_cfg=None) -> str | None:
    """Keep this recipe's log in ``<run_dir>/logs/`` (local or object storage); the first call wins, later calls
    (a recipe run by another) keep it where it is. Returns the log's final location, or None outside capture."""
    return None if _active is None else _active.log_to(run_dir, storage_cfg)


@contextlib.contextmanager
def capture(recipe: str | None = None, verbose: bool | None = None):
    """Route fd 1/2 through the console filter for the duration of the block (see the module doc)."""
    global _active
    if _active is not None:  # a recipe running another: one console
        yield _active
        return
    verbose = os.environ.get("CYTORAY_VERBOSE", "") not in ("", "0") if verbose is None else verbose
    console = Console(recipe or os.path.splitext(os.path.basename(sys.argv[0] or "cytoray"))[0] or "cytoray",
                      verbose)
    console.start()
    _active = console
    try:
        yield console
    finally:
        _active = None
        console.stop()


class Console:
    def __init__(self, recipe: str, verbose: bool = False):
        self.recipe, self.verbose = recipe, verbose
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        fd, self.path = tempfile.mkstemp(prefix=f"cytoray-{recipe}-", suffix=".log")
        self.log = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
        self.final_uri: str | None = None
        self.remote: tuple[str, object] | None = None  # (uri, storage_cfg) to upload the log to at the end
        self.lock = threading.Lock()
        self.progress_s = float(os.environ.get("CYTORAY_PROGRESS_S", "10"))
        self._saved: dict[int, int] = {}
        self._threads: list[threading.Thread] = []
        self._handler: logging.Handler | None = None
        self.stage: str | None = None

    # ------------------------------------------------------------------------------------------------ set-up

    def start(self) -> None:
        self.ray_before = _ray_up()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            self._saved[fd] = saved
            t = threading.Thread(target=self._pump, args=(read, saved), name=f"cytoray-console-{fd}", daemon=True)
            t.start()
            self._threads.append(t)
        self.terminal = os.fdopen(os.dup(self._saved[1]), "w", encoding="utf-8", errors="replace",
                                  buffering=1)
        self.tty = self.terminal.isatty()
        self._handler = RayDataProgress(self)
        logging.getLogger("ray.data._internal.progress.logging_progress").addHandler(self._handler)

    def stop(self) -> None:
        if _ray_up() and not self.ray_before:  # the recipe started Ray: its workers' last lines go to the log too
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
        logging.getLogger("ray.data._internal.progress.logging_progress").removeHandler(self._handler)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():  # the pipes' last write ends close: the pumps drain and end
            os.dup2(saved, fd)
        for t in self._threads:
            t.join(timeout=5.0)
        for saved in self._saved.values():  # the pumps wrote their last lines to these
            os.close(saved)
        where = self.final_uri or self.path
        self.log.close()
        if self.remote is not None:
            from cytoray import storage

            uri, storage_cfg = self.remote
            try:
                with open(self.path, "rb") as f:
                    storage.write_bytes(uri, f.read(), storage_cfg)
                os.unlink(self.path)
            except Exception as exc:  # the run's result must not depend on its log upload
                where = f"{self.path} (upload to {uri} failed: {exc})"
        print(f"full log: {where}", flush=True)
        self.terminal.close()

    def log_to(self, run_dir: str, storage_cfg=None) -> str:
        from cytoray import storage

        with self.lock:
            if self.final_uri is not None:
                return self.final_uri
            name = f"{self.recipe}_{self.stamp}.log"
            protocol, path = storage.split_protocol(run_dir)
            if protocol == "file":
                os.makedirs(os.path.join(path, "logs"), exist_ok=True)
                final = os.path.join(path, "logs", name)
                self.log.flush()
                with open(self.path, "rb") as src, open(final, "ab") as dst:
                    dst.write(src.read())
                self.log.close()
                os.unlink(self.path)
                self.path = final
                self.log = open(final, "a", encoding="utf-8", errors="replace")
                self.final_uri = final
            else:  # written locally, uploaded when the recipe ends
                self.final_uri = storage.join_uri(run_dir, "logs", name)
                self.remote = (self.final_uri, storage_cfg)
            return self.final_uri

    # ------------------------------------------------------------------------------------------------ lines

    def say(self, message: str) -> None:
        """Through the stdout pipe like any print, so lines keep the order they were written in."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.write(1, "".join(f"{SAID}{line}\n" for line in message.split("\n")).encode("utf-8", "replace"))

    def _log(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()

    def _pump(self, read_fd: int, out_fd: int) -> None:
        buf = b""
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = re.split(rb"\r\n|\n|\r", buf)
                for raw in lines:
                    self._route(raw.decode("utf-8", "replace"), out_fd)
        if buf:
            self._route(buf.decode("utf-8", "replace"), out_fd)

    def _route(self, line: str, out_fd: int) -> None:
        plain = ANSI.sub("", line)
        if plain.startswith(SAID):
            plain = shown = plain[len(SAID):]
        else:
            shown = visible(plain, self.verbose)
        with self.lock:
            self._log(plain)
            if shown is not None:
                os.write(out_fd, (shown + "\n").encode("utf-8", "replace"))


def _ray_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()


def visible(line: str, verbose: bool = False) -> str | None:
    """The text of a captured line as the terminal shows it, or None if it only goes to the log."""
    text = RAY_DEDUP.sub("", line)
    m = WORKER_PREFIX.match(text)
    body = text[m.end():] if m else text
    if body.startswith(MARKER):
        return body[len(MARKER):]
    if verbose:
        return text
    if not body.strip() or not PROBLEM.search(body) or any(p.search(body) for p in HARMLESS):
        return None
    return text


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """Progress of one long step: a tqdm bar on a terminal, otherwise a line every ``CYTORAY_PROGRESS_S``."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "images"):
        self.desc, self.total, self.unit = desc, total, unit
        self.done, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        console = _active
        self.bar = None
        if console is not None and console.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=console.terminal, leave=False,
                            dynamic_ncols=True)

    def update(self, done: int | None = None, increment: int = 0, total: int | None = None,
               now: bool = False) -> None:
        """Advance to ``done`` (or by ``increment``); ``now``: print the line now whatever the interval (for
        callers that are rate-limited already)."""
        if total is not None:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        new = self.done + increment if done is None else done
        if self.bar is not None:
            self.bar.update(new - self.done)
        self.done = new
        t = time.monotonic()
        if self.bar is None and _active is not None and (now or t - self.last >= _active.progress_s):
            self.last = t
            say(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.done < self.total:
            eta = f", ETA {format_seconds((self.total - self.done) / rate)}"
        return f"  {self.desc}: {self.done}{of} {self.unit} ({rate:.0f}/s{eta})"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@contextlib.contextmanager
def stage(name: str):
    """Name the step that Ray Data executions belong to, for their progress lines."""
    console = _active
    previous = console.stage if console is not None else None
    if console is not None:
        console.stage = name
    try:
        yield
    finally:
        if console is not None:
            console.stage = previous


class RayDataProgress(logging.Handler):
    """Turns Ray Data's non-interactive progress dumps ("Total Progress: done/total", every 10 s) into one
    progress line (or bar) for the current :func:`stage`; the dumps themselves stay in the log."""

    TOTAL = re.compile(r"^Total Progress: (\d+)/(\d+|\?)")

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console
        self.current: tuple[str, Progress] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.console.stage is None:
            return
        m = self.TOTAL.match(record.getMessage())
        if not m:
            if record.getMessage().startswith("======= Running Dataset:"):
                self._switch(record.getMessage())
            return
        done, total = int(m.group(1)), None if m.group(2) == "?" else int(m.group(2))
        if self.current is not None and done:  # Ray Data dumps every 10 s already
            self.current[1].update(done, total=total, now=True)

    def _switch(self, header: str) -> None:
        key = f"{self.console.stage}|{header}"
        if self.current is None or self.current[0] != key:
            if self.current is not None:
                self.current[1].close()
            self.current = (key, Progress(self.console.stage, unit="rows"))
