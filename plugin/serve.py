"""``python3 -m plugin.serve ARGS...``: gunicorn's own command line (``ARGS`` as for
``gunicorn``), minus the 12 MiB of ``pkg_resources``.

gunicorn 20.1 (Debian bookworm's) imports ``pkg_resources`` at the top of ``gunicorn.util``
and uses it only to resolve ``egg:`` worker URIs and worker names it does not know
(``load_class``); ``gthread`` it knows. Importing it costs 12 MiB of RSS in the master, and
the worker, forked from the master, counts the same pages again: 24 MiB of the idle
plugin's RSS sum for a module never used (issue 17). Here a stand-in takes its place
before gunicorn is imported: the first use, should one ever come, imports it for real, so
nothing changes but when.
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


def main() -> None:
    """Run gunicorn as its own ``gunicorn`` script does, with ``sys.argv`` as given."""
    defer_import("pkg_resources")
    from gunicorn.app.wsgiapp import run
    sys.exit(run())


if __name__ == "__main__":
    main()
