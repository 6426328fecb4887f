"""``/Plugin.Activate`` and ``/VolumeDriver.*``: Docker's volume plugin protocol."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app

from ..domain import Domain
from ..units import rfc3339
from .wire import docker_request, reply, required

bp = Blueprint("volume_driver", __name__)


def domain() -> Domain:
    return current_app.extensions["snapvol.domain"]


def _volume(name: str, mountpoint: Path | None, created: datetime | None,
            status: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": name}
    if mountpoint is not None:
        out["Mountpoint"] = str(mountpoint)
    if created is not None:               # omitted rather than anything but RFC 3339
        out["CreatedAt"] = rfc3339(created)
    if status is not None:
        out["Status"] = status
    return out


@bp.post("/Plugin.Activate")
def activate() -> Response:
    return reply(Implements=["VolumeDriver"])


@bp.post("/VolumeDriver.Capabilities")
def capabilities() -> Response:
    docker_request()
    return reply(Capabilities={"Scope": "local"})


@bp.post("/VolumeDriver.Create")
def create() -> Response:
    body = docker_request()
    domain().volumes.create(required(body, "Name"), body.get("Opts"))
    return reply()


@bp.post("/VolumeDriver.Remove")
def remove() -> Response:
    domain().volumes.remove(required(docker_request(), "Name"))
    return reply()


@bp.post("/VolumeDriver.Mount")
def mount() -> Response:
    body = docker_request()
    path = domain().volumes.mount(required(body, "Name"), required(body, "ID"))
    return reply(Mountpoint=str(path))


@bp.post("/VolumeDriver.Unmount")
def unmount() -> Response:
    body = docker_request()
    domain().volumes.unmount(required(body, "Name"), required(body, "ID"))
    return reply()


@bp.post("/VolumeDriver.Path")
def path() -> Response:
    return reply(Mountpoint=str(domain().volumes.path(required(docker_request(), "Name"))))


@bp.post("/VolumeDriver.Get")
def get() -> Response:
    view = domain().status.get(required(docker_request(), "Name"))
    return reply(Volume=_volume(view.name, view.mountpoint, view.created, view.status))


@bp.post("/VolumeDriver.List")
def list_volumes() -> Response:
    docker_request()
    return reply(Volumes=[_volume(v.name, v.mountpoint, v.created) for v in domain().volumes.list()])
