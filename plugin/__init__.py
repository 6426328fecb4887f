"""snapvol: a Docker volume plugin whose volumes are Btrfs subvolumes or ZFS datasets.

Layers, top to bottom (each imports only from the ones below it):
``api`` (Flask) -> ``scheduler``/``replication`` -> the domain (``domain`` assembles
``check``, ``status``, ``schedules``, ``transfers``, ``volumes``, in that order, with
``inflight``, ``retention``, ``quiesce``, ``history``) -> ``backends`` ->
``process``/``names``/``errors``.
"""

__version__ = "0.2.0"
