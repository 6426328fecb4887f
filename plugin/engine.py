"""The few Docker Engine API calls the plugin makes at every start, over ``http.client``.

Why not the Docker SDK: importing ``docker`` (with requests, urllib3, paramiko: 320 modules)
adds 13 MiB to the plugin process, and two routine jobs ran a second after every start
(the driver announcer, the removal of verify's leftover check containers). Through this
client the SDK is imported only by the paths that need more of the API (quiesce, a
verification's check container), on first use (issue 17: idle memory).
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .client import UnixHTTPConnection


class EngineClient:
    """Requests to the Docker Engine API at *base_url* (``unix:///path`` or ``tcp://host:port``,
    what ``SNAPVOL_DOCKER_HOST`` allows), each bounded by *timeout* seconds; one connection,
    reused (keep-alive) until :meth:`close`.

    Paths are unversioned, as the SDK's ``version="auto"`` amounted to: dockerd serves them
    at its own current API version."""

    def __init__(self, base_url: str, timeout: float) -> None:
        url = urlsplit(base_url)
        if url.scheme == "unix":
            self._conn: http.client.HTTPConnection = UnixHTTPConnection(url.path, timeout)
        else:
            self._conn = http.client.HTTPConnection(url.hostname or "localhost",
                                                    url.port or 2375, timeout=timeout)

    def call(self, method: str, path: str, **query: Any) -> Any:
        """``METHOD path?query``; the decoded JSON body, or None when there is none (204).
        A ``filters`` argument is a mapping, sent JSON-encoded as the API wants it.

        :raises OSError: dockerd cannot be reached.
        :raises http.client.HTTPException: the connection broke, or dockerd answered an error.
        """
        if "filters" in query:
            query["filters"] = json.dumps(query["filters"])
        self._conn.request(method, path + ("?" + urlencode(query) if query else ""))
        response = self._conn.getresponse()
        body = response.read()
        if not 200 <= response.status < 300:
            raise http.client.HTTPException(f"{method} {path}: HTTP {response.status}: "
                                            f"{body[:200].decode(errors='replace').strip()}")
        return json.loads(body) if body.strip() else None

    def info(self) -> dict[str, Any]:
        """``GET /info``: the daemon's description (``Plugins.Volume``: the volume drivers)."""
        return self.call("GET", "/info") or {}

    def list_volumes(self, **filters: list[str]) -> list[dict[str, Any]]:
        """The volumes matching *filters*; listing makes dockerd look up every legacy
        driver it finds in its plugin directories."""
        reply = self.call("GET", "/volumes", **({"filters": filters} if filters else {}))
        return list((reply or {}).get("Volumes") or [])

    def remove_volume(self, name: str) -> None:
        """Forget Docker's record of volume *name* (``force``: also when its driver fails)."""
        self.call("DELETE", f"/volumes/{quote(name, safe='')}", force="1")

    def list_containers(self, **filters: list[str]) -> list[dict[str, Any]]:
        """Every container (running or not) matching *filters*, as ``/containers/json``
        describes them."""
        return list(self.call("GET", "/containers/json", all="1",
                              **({"filters": filters} if filters else {})) or [])

    def remove_container(self, ident: str) -> None:
        """Remove container *ident*, killing it first if it runs."""
        self.call("DELETE", f"/containers/{quote(ident, safe='')}", force="1")

    def close(self) -> None:
        self._conn.close()
