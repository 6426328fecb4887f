"""snapvol: a Docker volume plugin whose volumes are Btrfs subvolumes (ZFS datasets to come).

Layers, top to bottom (each imports only from the ones below it):
``api`` (Flask) -> ``volumes`` (VolumeService) -> ``backends`` -> ``process``/``names``/``errors``.
"""

__version__ = "0.1.0"
