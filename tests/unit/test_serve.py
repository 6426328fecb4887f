"""plugin.serve: gunicorn runs without loading pkg_resources (12 MiB per process, issue 17),
and pkg_resources still works for whoever uses it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from plugin.serve import defer_import
defer_import("pkg_resources")
import gunicorn.app.wsgiapp, gunicorn.arbiter, gunicorn.util
from gunicorn.workers.gthread import ThreadWorker
assert gunicorn.util.load_class("gthread") is ThreadWorker
import pkg_resources                      # a second import must not load it either
loaded = sorted(m for m in sys.modules if m.startswith("pkg_resources."))
assert not loaded, loaded
assert pkg_resources.parse_version("1.10") > pkg_resources.parse_version("1.9")   # loads now
assert any(m.startswith("pkg_resources.") for m in sys.modules)
from pkg_resources import working_set
print("ok")
"""


def test_gunicorn_starts_without_pkg_resources_and_it_loads_on_first_use():
    # a fresh interpreter: pytest itself may have imported pkg_resources already
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


FREED = """
import ctypes, sys
from plugin.serve import give_back_freed_memory
if sys.argv[1] == "fixed":
    assert give_back_freed_memory()
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(4 << 20))            # one large free: glibc would raise its threshold
before = rss()
big, small = [], []
for _ in range(64):                        # 32 MiB of 512 KiB blocks, each followed by a
    # 16 KiB one that stays (too big for the free bits of the heap: it comes after the block)
    block = libc.malloc(512 << 10)
    ctypes.memset(block, 1, 512 << 10)
    big.append(block)
    small.append(libc.malloc(16 << 10))
for block in big:
    libc.free(block)
print(rss() - before)
"""


def test_memory_freed_by_large_blocks_goes_back_to_the_system():
    """With the thresholds fixed, 32 MiB of freed 512 KiB blocks leave RSS; with glibc's
    sliding threshold they stay in the heap, held by the small blocks between them."""
    kept = {}
    for mode in ("fixed", "default"):
        result = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        kept[mode] = int(result.stdout) / 1024          # MiB still resident
    assert kept["fixed"] < 2 and kept["default"] > 16, kept
