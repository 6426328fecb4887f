"""The only place that starts external programs: argv lists, timeouts, stderr in the error.

A string argv is a ``TypeError`` (no shell, ever). The child gets a fixed ``PATH`` and
``LC_ALL=C.UTF-8`` so messages are predictable and no secrets are inherited. Failures raise
:class:`~plugin.errors.CommandFailed` whose message is the copy-pastable command and the tail
of its stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import BackendError, CommandFailed, CommandTimeout

log = logging.getLogger(__name__)

CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def _argv(argv: Sequence[str | os.PathLike[str]]) -> tuple[str, ...]:
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of arguments, never a shell string")
    args = tuple(os.fspath(a) for a in argv)
    if not args:
        raise TypeError("argv must not be empty")
    return args


def run(argv: Sequence[str | os.PathLike[str]], *, stdin: bytes | None = None,
        timeout: float = 60.0, ok_codes: Collection[int] = (0,)) -> Result:
    """Run *argv* without a shell and return its decoded output.

    :raises CommandFailed: exit status not in *ok_codes* (the message has the stderr tail).
    :raises CommandTimeout: still running after *timeout* seconds (the child is killed).
    :raises BackendError: the program does not exist.
    """
    args = _argv(argv)
    log.debug("run: %s", shlex.join(args))
    try:
        proc = subprocess.run(args, input=stdin, capture_output=True, timeout=timeout,
                              env=CHILD_ENV, check=False)
    except FileNotFoundError:
        raise BackendError(f"{args[0]}: command not found; install it on the plugin host") from None
    except subprocess.TimeoutExpired:
        raise CommandTimeout(args, timeout) from None
    out, err = (s.decode("utf-8", "replace") for s in (proc.stdout, proc.stderr))
    if proc.returncode not in ok_codes:
        raise CommandFailed(args, proc.returncode, err)
    return Result(args, proc.returncode, out, err)
