"""The storage an instance serves, opened without the web layer.

gunicorn's master calls :func:`check_storage` before it binds the socket, and it has little
time for that: dockerd dials a managed plugin's socket for about 10 s after starting it (at
``enable``, ``install``, and every restart after a crash), then disables the plugin for good
(PROTOCOL.md section 5.3). Measured in the OpenZFS test VM under software emulation, importing
Flask took 2.7 s and libzfs_core 1.3 s of the 4-6 s the master needed before binding, enough
to miss that window on a loaded machine. So this module imports neither: the master runs only
the cheap checks that decide whether the storage can work at all (:meth:`preflight`), and the
worker, after the bind, opens the storage for real (:func:`open_backend`, the full
``check``: parent dataset, capabilities, crash recovery).
"""

from __future__ import annotations

from .backends.base import Backend
from .config import Settings
from .pool import prepare_root


def open_backend(settings: Settings, *, libzfs_core: bool = True) -> Backend:
    """The backend *settings* name, its storage made reachable (the Btrfs pool mounted).

    Each backend's module is imported only when chosen, so a ZFS host needs no btrfsutil.
    With *libzfs_core* false, the ZFS backend uses the CLI only (quick to import).

    :raises BackendUnavailable: the storage cannot be prepared.
    """
    if settings.backend == "zfs":
        from .backends.zfs import ZfsBackend
        from .backends.zfs_commands import load_libzfs_core
        return ZfsBackend(settings.zfs_root, settings.zfs_mounts,
                          load_libzfs_core() if libzfs_core else None)
    from .backends.btrfs import BtrfsBackend
    return BtrfsBackend(prepare_root(settings))


def check_storage(settings: Settings) -> None:
    """Decide, quickly and changing nothing but the Btrfs pool's mount, whether the storage
    can be served: the ZFS pool exists and userland and module versions match; the Btrfs
    root is mounted and on Btrfs.

    :raises BackendUnavailable: it cannot, and why.
    """
    open_backend(settings, libzfs_core=False).preflight()
