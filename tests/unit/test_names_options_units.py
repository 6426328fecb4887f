from __future__ import annotations

import os
from pathlib import Path

import pytest

from plugin import names, options
from plugin.errors import InvalidName, InvalidOption
from plugin.units import format_size, parse_size


@pytest.mark.parametrize("good", ["x", "v1", "A_b.c-d", "0" * 100, "a" * 64])
def test_valid_volume_names(good):
    assert names.volume_name(good) == good


@pytest.mark.parametrize("bad", ["", ".x", "-x", "_x", "../x", "a/b", "x;rm -rf /", "$(touch F)",
                                 "a\0b", "a b", "é", "x" * 101, None, 5, ["x"], {"a": 1}])
def test_invalid_volume_names(bad):
    with pytest.raises(InvalidName, match="invalid volume name"):
        names.volume_name(bad)


def test_long_names_are_shortened_in_messages():
    with pytest.raises(InvalidName) as info:
        names.volume_name("x" * 10000)
    assert len(str(info.value)) < 200


def test_under_refuses_symlink_escape(tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to("/etc")
    with pytest.raises(InvalidName, match="resolves outside"):
        names.under(root, "evil")
    assert names.under(root, "fine") == root / "fine"


@pytest.mark.parametrize("parts, inside", [
    (("v",), True), (("v", "data"), True), (("missing", "deeper"), True),
    (("v", "up"), False), (("v", "inner"), True), (("v", "loop"), False),
    (("link-in",), True), (("link-out", "x"), False), (("v", "..", ".."), False),
    (("v", ".."), False), (("",), False), ((".",), False), (("v/../v",), True),
    (("v/../../root2",), False),
])
def test_under_walks_below_the_root_as_realpath_would(tmp_path: Path, parts, inside):
    """The walk that skips the root's own components judges every path as resolving it
    whole does: symlinks inside and out, ``..``, the root itself, what does not exist."""
    root = tmp_path / "root"
    (root / "v" / "data").mkdir(parents=True)
    (tmp_path / "root2").mkdir()
    (root / "v" / "up").symlink_to(tmp_path)
    (root / "v" / "inner").symlink_to(root / "v" / "data")
    (root / "v" / "loop").symlink_to(root)                 # the root itself
    (root / "link-in").symlink_to("v")
    (root / "link-out").symlink_to(tmp_path / "root2")
    real = Path(os.path.realpath(root.joinpath(*parts)))
    assert (real != root and real.is_relative_to(root)) == inside   # the reference
    if inside:
        assert names.under(root, *parts) == root.joinpath(*parts)
    else:
        with pytest.raises(InvalidName, match="resolves outside"):
            names.under(root, *parts)


@pytest.mark.parametrize("text, size", [("1", 1), ("512M", 512 << 20), ("20G", 20 << 30),
                                        ("1TiB", 1 << 40), ("2k", 2048), (" 3G ", 3 << 30)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1G", "1X", "1 G", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert [format_size(n) for n in (0, 1536, 10 << 20, 300 << 30)] == ["0B", "1.5K", "10.0M", "300G"]


def test_schedule_options_are_normalised():
    assert options.validate({"schedule": "1h", "keep": " 24h 7d, last=3 within=2d",
                             "quiesce": "pause", "from": "db@s1"}, "zfs") == {
        "schedule": "1h", "keep": "last=3,within=2d,24h,7d", "quiesce": "pause", "from": "db@s1"}


def test_validate_normalises():
    assert options.validate({"mode": "0750", "uid": "0042", "nocow": "YES", "size": "1G",
                             "compression": "zstd"}, "btrfs") == {
        "mode": "750", "uid": "42", "nocow": "true", "size": "1G", "compression": "zstd"}
    assert options.validate(None, "btrfs") == {}


@pytest.mark.parametrize("raw, message", [
    ({"size": "0"}, "option size='0': must be between 1M and 1048576T"),
    ({"size": "9" * 40}, "option size='" + "9" * 40 + "': must be between 1M and 1048576T"),
    ({"size": "lots"}, "option size='lots': expected a whole number"),
    ({"uid": "-1"}, "option uid='-1': must be a number from 0 to 4294967294"),
    ({"gid": "4294967295"}, "option gid='4294967295': must be a number from 0 to 4294967294"),
    ({"mode": "888"}, "option mode='888': must be octal permission bits"),
    ({"mode": "17777"}, "option mode='17777': must be octal permission bits"),
    ({"compression": "lz4"}, "option compression='lz4': must be one of lzo, none, zlib, zstd"),
    ({"nocow": "maybe"}, "option nocow='maybe': must be true or false"),
    ({"atime": "off"}, "option atime is for zfs volumes only"),
    ({"schedule": "1h", "replicate": "ssh://-oProxyCommand=x"}, "option replicate='ssh://-oProxyCommand=x': bad host"),
    ({"schedule": "1h", "replicate": "ftp://h"}, "option replicate='ftp://h': unknown target"),
    ({"schedule": "1h", "replicate": "/run/../etc/x.sock"}, "option replicate='/run/../etc/x.sock': bad socket path"),
    ({"replicate": "ssh://h"}, "option replicate applies to automatic snapshots"),
    ({"schedule": "0s"}, "option schedule='0s': must be from 1s to 1y"),
    ({"schedule": "2y"}, "option schedule='2y': must be from 1s to 1y"),
    ({"schedule": "hourly"}, "option schedule='hourly': expected a whole number and a unit"),
    ({"schedule": "1h", "keep": "7x"}, "option keep='7x': bad token '7x'; use last=N, within="),
    ({"schedule": "1h", "keep": "7d,8d"}, "option keep='7d,8d': '8d' repeats 'd'"),
    ({"schedule": "1h", "keep": "last=0"}, "option keep='last=0': bad token 'last=0'"),
    ({"schedule": "1h", "keep": " , "}, "option keep=' , ': empty policy"),
    ({"schedule": "1h", "quiesce": "freeze"}, "option quiesce='freeze': must be one of none, pause"),
    ({"keep": "7d"}, "option keep applies to automatic snapshots; give schedule= too"),
    ({"quiesce": "pause"}, "option quiesce applies to automatic snapshots"),
    ({"from": "a", "uid": "1"}, "option(s) uid cannot be combined with from="),
    ({"x" * 5000: "1"}, "unknown option(s): 'xxxx"),
    ({"size": None}, "option size: the value must be a string"),
    (["size=1G"], "Opts must be a map"),
])
def test_validate_refuses(raw, message):
    with pytest.raises(InvalidOption) as info:
        options.validate(raw, "btrfs")
    assert str(info.value).startswith(message)
    assert len(str(info.value)) < 300


def test_libzfs_core_errors_keep_errno_and_each_reason():
    """pyzfs raises ZFSError (errno, message, name) and, for several snapshots at once,
    MultipleOperationsError whose own message says only "one or more reasons"."""
    import errno

    from plugin.backends.zfs_commands import lzc_failed

    class ZFSError(Exception):
        def __init__(self, code, message, name=None):
            super().__init__(message)
            self.errno, self.message, self.name = code, message, name

    class SnapshotDestructionFailure(ZFSError):
        def __init__(self, errors):
            super().__init__(errors[0].errno, "Destruction of snapshot(s) failed for one or more reasons")
            self.errors = errors

    error = lzc_failed("cannot destroy snapshot v1@s1", SnapshotDestructionFailure(
        [ZFSError(errno.EEXIST, "Snapshot is cloned", b"tank/snapvol/v1@s1")]))
    assert error.errno == errno.EEXIST
    assert str(error) == ("cannot destroy snapshot v1@s1: EEXIST: Destruction of snapshot(s) "
                          "failed for one or more reasons; EEXIST: Snapshot is cloned "
                          "(tank/snapvol/v1@s1)")
    assert lzc_failed("cannot hold", RuntimeError("boom")).errno is None


def test_internal_names_are_the_backends_and_never_a_clients():
    """snapvol.<kind>.<id> names the trash's volumes: a backend stores them, no client may
    create, mount or remove one by that name."""
    internal = names.internal_name("trash", "0123456789ab")
    assert internal == "snapvol.trash.0123456789ab" and names.is_internal(internal)
    assert names.stored_volume_name(internal) == internal
    with pytest.raises(InvalidName, match="reserved for snapvol's own volumes"):
        names.volume_name(internal)
    with pytest.raises(InvalidName, match="reserved"):
        names.volume_name("snapvol.mine")
    assert names.volume_name("snapvolx") == "snapvolx" and not names.is_internal("snapvol-data")


def test_the_trash_option():
    assert options.validate({"trash": "off"}, "btrfs") == {"trash": "off"}
    with pytest.raises(InvalidOption, match="trash"):
        options.validate({"trash": "later"}, "zfs")
