"""Why a managed plugin refuses to serve (stdlib only: the gunicorn master imports it before
binding, when Flask must not be loaded yet; see ``plugin.gunicorn_conf``)."""

from __future__ import annotations

from collections.abc import Mapping

REFUSAL_ENV = "SNAPVOL_REFUSAL"          # set by the gunicorn master for its worker


def managed_plugin_refusal(problem: str) -> str:
    """The answer of a managed plugin whose data directory another snapvol holds."""
    return (f"this snapvol managed plugin cannot serve: {problem}. That is another snapvol on "
            "this host (the host install of ./scripts/run, or another plugin) using the same "
            "host directory (the plugin's data mount, /var/lib by default). Give the plugin a "
            "directory of its own: mkdir -p /var/lib/snapvol-plugin && docker plugin disable "
            "PLUGIN && docker plugin set PLUGIN data.source=/var/lib/snapvol-plugin && docker "
            "plugin enable PLUGIN; or stop the other snapvol first (./scripts/run stop), then "
            "docker plugin disable PLUGIN && docker plugin enable PLUGIN")


def is_managed(environ: Mapping[str, str]) -> bool:
    """Whether this is the managed plugin (its image sets ``SNAPVOL_PUBLISH_DIR``)."""
    return bool(environ.get("SNAPVOL_PUBLISH_DIR"))


def start_refusal(problem: str) -> str:
    """The answer of a managed plugin that cannot use its settings or its storage.

    It answers instead of exiting because its socket listens before these checks
    (``plugin.prebind``): dockerd restarts a managed plugin that exits, at once and for ever.
    """
    return (f"snapvol cannot start: {problem}. Fix it (docker plugin set PLUGIN NAME=VALUE for "
            "a setting; the pool or dataset on the host for storage), then: docker plugin "
            "disable PLUGIN && docker plugin enable PLUGIN")
