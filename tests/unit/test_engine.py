"""plugin.engine against a stand-in dockerd on a Unix socket: the routine start-up calls
(announcer, verify's leftovers) reach Docker without the Docker SDK."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from plugin.announce import DriverAnnouncer
from plugin.verify import CONTAINER_LABEL, SCRATCH_PREFIX
from plugin.verify_docker import CheckCannotRun, DockerChecks

Route = Callable[[str, str, dict[str, list[str]]], tuple[int, Any]]


@contextmanager
def stand_in_dockerd(path: Path, route: Route) -> Iterator[list[tuple[str, str]]]:
    """Serve *route(method, path, query)* -> (status, JSON body or None) at *path*; yield
    the (method, path) of every request."""
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            url = urlsplit(self.path)
            seen.append((self.command, url.path))
            status, body = route(self.command, url.path, parse_qs(url.query))
            raw = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        do_GET = do_DELETE = answer

        def log_message(self, *args: Any) -> None:
            pass

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

        def get_request(self):            # BaseHTTPRequestHandler wants a (host, port)
            request, _ = super().get_request()
            return request, ("local", 0)

    with Server(str(path), Handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield seen
        finally:
            server.shutdown()


def test_the_announcer_looks_the_driver_up_through_the_engine_api(tmp_path):
    listed = ["local"]

    def route(method: str, path: str, query: dict) -> tuple[int, Any]:
        if path == "/volumes":
            listed.append("snapvol")          # dockerd found the socket while listing
            return 200, {"Volumes": [], "Warnings": None}
        return 200, {"Plugins": {"Volume": list(listed)}}

    with stand_in_dockerd(tmp_path / "docker.sock", route) as seen:
        assert DriverAnnouncer(f"unix://{tmp_path}/docker.sock", "snapvol", timeout=5).check()
    assert seen == [("GET", "/info"), ("GET", "/volumes"), ("GET", "/info")]


def test_an_absent_dockerd_is_unreachable_not_an_error(tmp_path):
    assert not DriverAnnouncer(f"unix://{tmp_path}/none.sock", "snapvol", timeout=5).check()


def test_verify_leftovers_are_found_by_label_and_removed_with_force(tmp_path):
    removed: list[str] = []

    def route(method: str, path: str, query: dict) -> tuple[int, Any]:
        if method == "GET" and path == "/containers/json":
            assert query["all"] == ["1"]
            assert json.loads(query["filters"][0]) == {"label": [CONTAINER_LABEL]}
            return 200, [{"Id": "c1"}, {"Id": "c2"}]
        if method == "GET" and path == "/volumes":
            assert json.loads(query["filters"][0]) == {"name": [SCRATCH_PREFIX]}
            return 200, {"Volumes": [{"Name": SCRATCH_PREFIX + "0123456789ab"},
                                     {"Name": "x" + SCRATCH_PREFIX}]}
        if method == "DELETE":
            assert query["force"] == ["1"]
            removed.append(path)
            return 204, None
        return 404, {"message": "no such route"}

    with stand_in_dockerd(tmp_path / "docker.sock", route):
        checks = DockerChecks(f"unix://{tmp_path}/docker.sock", driver=lambda: "snapvol:latest")
        assert checks.remove_leftovers() == 2
    assert removed == ["/containers/c1", "/containers/c2",
                       f"/volumes/{SCRATCH_PREFIX}0123456789ab"]


def test_a_refusing_dockerd_is_reported_as_a_check_that_cannot_run(tmp_path):
    with stand_in_dockerd(tmp_path / "docker.sock",
                          lambda *_: (500, {"message": "daemon is shutting down"})):
        with pytest.raises(CheckCannotRun, match="HTTP 500: .*shutting down"):
            DockerChecks(f"unix://{tmp_path}/docker.sock").remove_leftovers()
