"""The only place that starts external programs: argv lists, timeouts, stderr in the error.

A string argv is a ``TypeError`` (no shell, ever). The child gets a fixed ``PATH`` and
``LC_ALL=C.UTF-8`` so messages are predictable and no secrets are inherited. Failures raise
:class:`~plugin.errors.CommandFailed` whose message is the copy-pastable command and the tail
of its stderr.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shlex
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .errors import BackendError, CommandFailed, CommandTimeout

log = logging.getLogger(__name__)

_F_SETPIPE_SZ = 1031   # fcntl.F_SETPIPE_SZ (Linux), named in fcntl only from Python 3.10 on some builds
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


class Streaming:
    """A child whose stdin or stdout is a pipe we stream through (send, receive, ssh).

    stderr goes to a temporary file so a chatty child can never block on it; :meth:`finish`
    waits and raises with its tail. Used as a context manager, the child is killed and reaped
    if the block fails, so no stream process outlives its transfer.
    """

    def __init__(self, argv: Sequence[str | os.PathLike[str]], *, feed: bool,
                 stdin: int | None = None, stdout: int | None = None) -> None:
        """*feed*: we write its stdin (stdout: *stdout*, e.g. the next program's input, or
        null); otherwise we read its stdout (stdin: *stdin*, e.g. the previous program's
        output, or null)."""
        import tempfile

        self.argv = _argv(argv)
        self._stderr = tempfile.TemporaryFile()
        log.debug("stream: %s", shlex.join(self.argv))
        try:
            self.proc = subprocess.Popen(
                self.argv, env=CHILD_ENV, stderr=self._stderr,
                stdin=subprocess.PIPE if feed else (stdin if stdin is not None else subprocess.DEVNULL),
                stdout=(stdout if stdout is not None else subprocess.DEVNULL) if feed else subprocess.PIPE)
        except FileNotFoundError:
            self._stderr.close()
            raise BackendError(f"{self.argv[0]}: command not found; install it on the plugin host") from None
        pipe = self.proc.stdin if feed else self.proc.stdout
        try:   # a 1 MiB pipe instead of 64 KiB: fewer context switches per stream
            fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, 1 << 20)
        except OSError:
            pass   # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep the default

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-4000:].decode("utf-8", "replace")

    def finish(self, timeout: float = 120.0) -> None:
        """Close our end, wait for the child, and check its status.

        :raises CommandFailed: non-zero exit (the message has its stderr tail).
        :raises CommandTimeout: still running after *timeout* seconds (then killed).
        """
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:   # the child is gone; its status tells why
                    pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CommandTimeout(self.argv, timeout) from None
        if code != 0:
            raise CommandFailed(self.argv, code, self.stderr_tail())

    def close_input_and_wait(self, timeout: float) -> None:
        """End the child's input and let it exit by itself (killed after *timeout*)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> Streaming:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None or self.proc.poll() is None:
            self.kill()
        self._stderr.close()
