"""Fixtures of the browser tests: headless Chromium from the OS packages.

The network helpers of the end-to-end suite (``tests/e2e/e2e_support.py``)
are shared: that folder is put on sys.path here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parent.parent / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

BROWSERS = ("chromium", "chromium-browser")


def _find() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _apt_install() -> str:
    """Install Debian's chromium (as root); '' on success, else why not."""
    if os.geteuid() != 0:
        return "not root: cannot apt-get install chromium"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "chromium"]
    try:
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                return f"apt-get install chromium failed: {done.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        return "apt-get install chromium timed out"
    return ""


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of a headless-capable Chromium; installed from the OS packages if missing."""
    path = _find()
    if path is None:
        why = _apt_install()
        path = _find()
        if path is None:
            reason = why or "chromium installed but not on PATH"
            if os.environ.get("CI") == "true":
                pytest.fail(f"browser test needs Chromium: {reason}")
            pytest.skip(f"no Chromium: {reason}")
    return path
