"""``/Plugin.Activate`` and ``/VolumeDriver.*``: Docker's volume plugin protocol."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app

from ..domain import Domain
from ..errors import VolumeNotFound
from ..units import rfc3339
from ..verify import SCRATCH_NAME
from .wire import docker_request, reply, required

bp = Blueprint("volume_driver", __name__)


def domain() -> Domain:
    return current_app.extensions["snapvol.domain"]


def _volume(name: str, mountpoint: Path | str | None, created: datetime | None,
            status: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"Name": name}
    if mountpoint is not None:
        out["Mountpoint"] = str(mountpoint)
    if created is not None:               # omitted rather than anything but RFC 3339
        out["CreatedAt"] = rfc3339(created)
    if status is not None:
        out["Status"] = status
    return out


def _scratch(name: object) -> bool:
    """Whether *name* is a scratch clone of a verification (``snapvol.verify.<hex>``): the
    managed plugin mounts one into its check container as a volume of its own driver, so
    Docker asks for it by name. Answered from the verifier's table, with no lock (the
    verification holds none while its check runs)."""
    return isinstance(name, str) and SCRATCH_NAME.fullmatch(name) is not None


def _scratch_path(name: str) -> Path:
    verifier = domain().verifier
    path = verifier.active_clone(name) if verifier is not None else None
    if path is None:
        raise VolumeNotFound(name)
    return path


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
    if _scratch(body.get("Name")):
        _scratch_path(body["Name"])             # only while its verification runs
        return reply()
    domain().volumes.create(required(body, "Name"), body.get("Opts"))
    return reply()


@bp.post("/VolumeDriver.Remove")
def remove() -> Response:
    name = required(docker_request(), "Name")
    if _scratch(name):
        return reply()          # Docker forgets it; the verification destroys the clone
    domain().volumes.remove(name)
    return reply()


@bp.post("/VolumeDriver.Mount")
def mount() -> Response:
    body = docker_request()
    if _scratch(body.get("Name")):
        return reply(Mountpoint=str(_scratch_path(body["Name"])))
    path = domain().volumes.mount(required(body, "Name"), required(body, "ID"))
    return reply(Mountpoint=str(path))


@bp.post("/VolumeDriver.Unmount")
def unmount() -> Response:
    body = docker_request()
    if _scratch(body.get("Name")):
        return reply()          # nothing counted: the clone lives as long as its check
    domain().volumes.unmount(required(body, "Name"), required(body, "ID"))
    return reply()


@bp.post("/VolumeDriver.Path")
def path() -> Response:
    name = required(docker_request(), "Name")
    if _scratch(name):
        return reply(Mountpoint=str(_scratch_path(name)))
    return reply(Mountpoint=str(domain().volumes.path(name)))


@bp.post("/VolumeDriver.Get")
def get() -> Response:
    name = required(docker_request(), "Name")
    if _scratch(name):
        return reply(Volume=_volume(name, _scratch_path(name), None))
    view = domain().status.get(name)
    return reply(Volume=_volume(view.name, view.mountpoint, view.created, view.status))


@bp.post("/VolumeDriver.List")
def list_volumes() -> Response:
    docker_request()
    return reply(Volumes=[_volume(v.name, v.path, v.created) for v in domain().volumes.list()])
