"""The errors a user can fix, and how recipes report them.

Every error about what the user gave — config keys and values, dataset layouts and files, manifests, checkpoints,
object storage that stays unreachable after the retries — derives from :class:`UserError`; its message names the
thing and the fix. Recipes run their ``main`` through :func:`run_recipe`: a ``UserError`` anywhere in the cause
chain (also inside a Ray task's error) prints as one line on stderr and exits 1; ``--debug`` or
``CYTORAY_DEBUG=1`` shows the whole traceback instead. Anything else is a bug and keeps its traceback.
The recipe's output goes through :func:`cytoray.console.capture` (``--verbose`` shows every line).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(ValueError):
    """Bad input or an unreachable resource: the message says what and how to fix it."""


class StorageError(UserError, OSError):
    """Object storage kept failing after every retry."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The first UserError in ``exc``'s cause chain (Ray task errors carry theirs in ``cause``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def run_recipe(main: Callable[[list[str]], object], argv: list[str] | None = None) -> int:
    """Run a recipe's ``main(argv)`` with its output filtered into a run log; a user error becomes one line on
    stderr and exit status 1."""
    from cytoray import console

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CYTORAY_DEBUG", "") not in ("", "0")
    verbose = True if "--verbose" in argv else None
    argv = [a for a in argv if a not in ("--debug", "--verbose")]
    try:
        with console.capture(verbose=verbose):
            main(argv)
    except Exception as exc:
        found = find_user_error(exc)
        if found is None or debug:
            raise
        print(f"cytoray: error: {found}".replace("\n", " "), file=sys.stderr)
        print("cytoray: (rerun with --debug or CYTORAY_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0
