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
