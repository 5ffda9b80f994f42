"""Fixtures of the end-to-end suite: each module starts its own network once.

The test-side terminal and the network helpers are in ``e2e_support`` (this
folder is on sys.path for its modules, as pytest puts a test's folder there).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_support import Running, start_up


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, request) -> Path:
    """A fresh directory per module: network file, data_dir, captured logs."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def launch():
    """``launch(net, workdir, ...)`` starts `cardswitch up`; whatever a test left
    running is killed at the end of the module (the test has failed by then)."""
    runs: list[Running] = []

    def _launch(net, wd: Path, **kw) -> Running:
        run = start_up(net, wd, **kw)
        runs.append(run)
        return run

    yield _launch
    for run in runs:
        run.kill()
