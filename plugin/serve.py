"""``python3 -m plugin.serve ARGS...``: gunicorn's own command line (``ARGS`` as for
``gunicorn``), minus the 12 MiB of ``pkg_resources``.

gunicorn 20.1 (Debian bookworm's) imports ``pkg_resources`` at the top of ``gunicorn.util``
and uses it only to resolve ``egg:`` worker URIs and worker names it does not know
(``load_class``); ``gthread`` it knows. Importing it costs 12 MiB of RSS in the master, and
the worker, forked from the master, counts the same pages again: 24 MiB of the idle
plugin's RSS sum for a module never used (issue 17). Here a stand-in takes its place
before gunicorn is imported: the first use, should one ever come, imports it for real, so
nothing changes but when.

:func:`give_back_freed_memory` is here too: the worker calls it (``post_worker_init``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class DeferredModule(types.ModuleType):
    """Stands in for a module in ``sys.modules`` until one of its attributes is read.

    Not :class:`importlib.util.LazyLoader`: on Python 3.11 every later ``import`` of the
    name reads ``__spec__``, which makes a lazy module load at once. The stand-in has a
    ``__spec__`` of its own; ``__getattr__`` runs only for what it lacks."""

    def __getattr__(self, attr: str) -> Any:
        real = sys.modules.get(self.__name__)
        if real is self or real is None:
            sys.modules.pop(self.__name__, None)
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer_import(name: str) -> None:
    """Make ``import name`` cheap until the module is used (see :class:`DeferredModule`).
    Nothing happens when *name* is already imported or cannot be found."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    stand_in = DeferredModule(name)
    stand_in.__spec__ = spec          # `import name` reads __spec__._initializing
    sys.modules[name] = stand_in


_M_TRIM_THRESHOLD = -1            # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 128 * 1024             # glibc's own starting value for both


def give_back_freed_memory() -> bool:
    """Make glibc hand freed memory back to the system instead of keeping it for later
    (issue 17: memory given back when volumes go). Returns whether glibc took it.

    By default glibc raises its mmap threshold each time a large block is freed (up to
    32 MiB), so later large blocks (a List reply at 10,000 volumes, the trash journal's
    compaction) come from the heap, which keeps what they free. Fixed at 128 KiB, every
    such block gets a mapping of its own, returned when freed, and the heap's free top is
    trimmed above 128 KiB. Measured at 10,000 volumes made, removed and purged: RSS of the
    plugin after the purge 73.0 MiB before, 69.6 after. A no-op without glibc.

    Called in the worker, which holds the volumes and has ctypes loaded already (the master
    would pay 0.5 MiB to import it, for memory it does not churn)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, _THRESHOLD) == 1 for param in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def main() -> None:
    """Run gunicorn as its own ``gunicorn`` script does, with ``sys.argv`` as given."""
    defer_import("pkg_resources")
    from gunicorn.app.wsgiapp import run
    sys.exit(run())


if __name__ == "__main__":
    main()
