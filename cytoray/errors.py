"""The errors a user can fix, and how recipes report them.

Every error about what the user gave — config keys and values, dataset layouts and files, manifests, checkpoints,
object storage that stays unreachable after the retries — derives from :class:`UserError`; its message names the
thing and the fix. Recipes run their ``main`` through :func:`cytoray.console.run_recipe`: a ``UserError``
anywhere in the cause chain (also inside a Ray task's error) prints as one line on stderr and exits 1;
``--debug`` or ``CYTORAY_DEBUG=1`` shows the whole traceback instead. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


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
