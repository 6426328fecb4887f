"""The ssh client snapvol runs for ``ssh://`` targets: its argv, and whether it can work here.

Where the key and the known_hosts come from (settings, see README "Settings"):

* ``SNAPVOL_SSH_KEY`` / ``SNAPVOL_SSH_KNOWN_HOSTS`` when set;
* else, when ``SNAPVOL_SSH_DIR`` is set (the managed plugin sets it to its ``ssh`` mount), the
  first of ``id_ed25519``, ``id_ecdsa``, ``id_rsa`` and the ``known_hosts`` in that directory,
  looked up at each connection, so a key added later works without a restart;
* else ssh's own default keys and ``/root/.ssh/known_hosts``.

:meth:`SshClient.unusable` is asked at volume create: a ``replicate=``/``standby=`` over ssh
that can never work here (no ssh client in the plugin, no known_hosts, a key that is not
there) is refused then, with the reason, instead of failing at every sync afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from .targets import Target

KEY_NAMES = ("id_ed25519", "id_ecdsa", "id_rsa")
DEFAULT_KNOWN_HOSTS = "/root/.ssh/known_hosts"


@dataclass(frozen=True)
class SshClient:
    key: str = ""                  # SNAPVOL_SSH_KEY ("": from directory, else ssh's default)
    known_hosts: str = ""          # SNAPVOL_SSH_KNOWN_HOSTS ("": from directory, else default)
    directory: Path | None = None  # SNAPVOL_SSH_DIR
    remote_snapvol: str = "snapvol"

    def identity(self) -> str | None:
        """The private key file to offer, or None for ssh's own defaults."""
        if self.key:
            return self.key
        if self.directory is not None:
            for name in KEY_NAMES:
                if (self.directory / name).is_file():
                    return str(self.directory / name)
        return None

    def known_hosts_file(self) -> str:
        if self.known_hosts:
            return self.known_hosts
        if self.directory is not None:
            return str(self.directory / "known_hosts")
        return DEFAULT_KNOWN_HOSTS

    def argv(self, where: Target, *command: str) -> list[str]:
        """ssh in batch mode with host keys checked against our known_hosts file, running
        ``snapvol COMMAND...`` there; the remote command is quoted word by word (ssh hands it
        to the remote shell as one string)."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts_file()}", "-o", "ConnectTimeout=10",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        key = self.identity()
        if key:
            argv += ["-i", key, "-o", "IdentitiesOnly=yes"]
        if where.port:
            argv += ["-p", str(where.port)]
        remote = [self.remote_snapvol, *(["--socket", where.socket] if where.socket else []),
                  *command]
        destination = f"{where.user}@{where.host}" if where.user else where.host
        return [*argv, "--", destination, shlex.join(remote)]

    def unusable(self) -> str | None:
        """Why no ssh target can work from here (None: it may; the far side decides the rest).
        Checks only what is always fatal: a host key that is not yet in known_hosts, or a
        target that is down, are faults a later sync recovers from, not a wrong setting. (Not
        the network: a host with only a loopback interface still reaches 127.0.0.1.)"""
        if shutil.which("ssh") is None:
            return ("this snapvol has no ssh client (the `ssh` command); install "
                    "openssh-client, or use a snapvol 0.3 plugin image, which has it")
        known_hosts = self.known_hosts_file()
        if not os.access(known_hosts, os.R_OK):
            return (f"no known_hosts file {known_hosts} (host keys are always checked): "
                    + self._where_files_go())
        if self.key and not os.access(self.key, os.R_OK):
            return f"the private key SNAPVOL_SSH_KEY={self.key} cannot be read"
        return None

    def _where_files_go(self) -> str:
        if self.directory is not None:
            return (f"put the targets' host keys (ssh-keyscan) into known_hosts and a private key "
                    f"(id_ed25519) into the directory SNAPVOL_SSH_DIR={self.directory} "
                    "(managed plugin: the host directory of its ssh mount, by default "
                    "/var/lib/snapvol/ssh)")
        return "set SNAPVOL_SSH_KNOWN_HOSTS, or create it with ssh-keyscan"

