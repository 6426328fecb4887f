"""Replication targets: another snapvol, over ssh or on a local socket. Parsing only (stdlib).

* ``ssh://[user@]host[:port][/path/of/the/remote/plugin.sock]`` runs ``snapvol receive`` on
  the host (with ``--socket`` when a path is given);
* ``unix:///path/of/plugin.sock`` (or just the absolute path) is a second instance on this host.

Every part is checked against a narrow grammar, so nothing in a target can become an ssh
option (a host starting with ``-``) or a shell word on the remote side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GRAMMAR = ("ssh://[user@]host[:port][/remote/plugin.sock] or unix:///path/to/plugin.sock")
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\]")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
_PATH = re.compile(r"(/[A-Za-z0-9_.-]+)+")


@dataclass(frozen=True)
class Target:
    kind: str                   # "ssh" | "unix"
    host: str = ""
    user: str | None = None
    port: int | None = None
    socket: str | None = None   # ssh: the remote plugin's socket (None: discovery there)

    @classmethod
    def parse(cls, text: object) -> Target:
        """:raises ValueError: not of the grammar (the message shows it)."""
        if not isinstance(text, str) or len(text) > 512:
            raise ValueError(f"a target is {GRAMMAR}")
        if text.startswith("/") or text.startswith("unix://"):
            path = text.removeprefix("unix://")
            if not _PATH.fullmatch(path) or "/../" in path + "/" or "/./" in path + "/":
                raise ValueError(f"bad socket path {path[:80]!r}; a target is {GRAMMAR}")
            return cls("unix", socket=path)
        match = re.fullmatch(r"ssh://(?:([^@/]+)@)?(\[[^\]]+\]|[^:/]+)(?::(\d{1,5}))?(/.*)?", text)
        if not match:
            raise ValueError(f"unknown target {text[:80]!r}; a target is {GRAMMAR}")
        user, host, port, path = match.groups()
        if user is not None and not _USER.fullmatch(user):
            raise ValueError(f"bad user {user[:40]!r} in the target")
        if not _HOST.fullmatch(host):
            raise ValueError(f"bad host {host[:80]!r} in the target")
        if port is not None and not 1 <= int(port) <= 65535:
            raise ValueError(f"bad port {port} in the target")
        if path is not None and (not _PATH.fullmatch(path) or "/../" in path + "/"):
            raise ValueError(f"bad remote socket path {path[:80]!r} in the target")
        return cls("ssh", host, user, int(port) if port else None, path)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.socket}"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.host}{port}{self.socket or ''}"
