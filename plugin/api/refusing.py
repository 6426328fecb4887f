"""The app a managed plugin serves when it must not touch its storage: every call answers
the reason in ``Err``.

Why not exit, as a host install does (``./scripts/run`` shows its error)? dockerd starts a
managed plugin and only waits for its socket: a plugin that exits is reported to the user as
"dial unix .../snapvol.sock: connect: no such file or directory", the real reason is only in
dockerd's log. Served instead, the reason reaches ``docker volume create``/``ls``/``inspect``,
``docker run -v`` and ``snapvol status`` verbatim, with what to do.
"""

from __future__ import annotations

from flask import Flask, Response

from .wire import reply


def refusing_app(reason: str) -> Flask:
    """Answers the handshake (so Docker keeps the driver and shows its errors) and refuses
    everything else with *reason*, changing nothing."""
    app = Flask(__name__)

    @app.post("/Plugin.Activate")
    def activate() -> Response:
        return reply(Implements=["VolumeDriver"])

    @app.post("/VolumeDriver.Capabilities")
    def capabilities() -> Response:
        return reply(Capabilities={"Scope": "local"})

    @app.route("/<path:_endpoint>", methods=["GET", "POST"])
    def refuse(_endpoint: str) -> Response:
        return reply(503, Err=reason)

    return app
