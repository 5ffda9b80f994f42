"""End to end: `cardswitch check` and `cardswitch up` on good and bad network files.

A bad file is refused with one line on stderr naming the file, the line and
the key, a non-zero exit and no traceback (operations.md 1-2); `up` starts
nothing and never prints `ready`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from cardswitch.netfile import dump_network

from e2e_support import default_test_network

pytestmark = pytest.mark.e2e

GOOD_PAN = "6221260000000018"
BAD_PAN = "6221260000000019"      # the same card with a wrong check digit


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cardswitch.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def _insert_after(text: str, anchor: str, line: str) -> str:
    i = text.index(anchor) + len(anchor)
    j = text.index("\n", i) + 1
    return text[:j] + line + "\n" + text[j:]


def _luhn(text: str) -> str:
    return text.replace(f'pan = "{GOOD_PAN}"', f'pan = "{BAD_PAN}"')


def _unknown_switch_key(text: str) -> str:
    return _insert_after(text, "[switch]", 'colour = "blue"')


def _unknown_card_key(text: str) -> str:
    return _insert_after(text, 'pan = "6228480000000015"', '  nickname = "rich"')


# (name, how to break the file, text of the line that is wrong, key path named)
CASES = [
    ("luhn", _luhn, f'pan = "{BAD_PAN}"', "banks[0].cards[0].pan", "Luhn"),
    ("unknown-switch-key", _unknown_switch_key, 'colour = "blue"', "switch.colour", "unknown key"),
    ("unknown-card-key", _unknown_card_key, 'nickname = "rich"', "banks[1].cards[0].nickname", "unknown key"),
]


@pytest.fixture(scope="module")
def good_text(workdir) -> str:
    return dump_network(default_test_network(workdir / "var"))


@pytest.mark.parametrize("command", ["check", "up"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_network_file_is_refused_with_one_line(workdir, good_text, command, case):
    name, breaker, bad_line, key, what = case
    text = breaker(good_text)
    assert text != good_text
    path = workdir / f"{name}.toml"
    path.write_text(text)
    lineno = text.splitlines().index(next(ln for ln in text.splitlines() if ln.strip() == bad_line)) + 1

    res = _cli(command, "-c", str(path), cwd=workdir)

    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    assert f"{path}:{lineno}: {key}" in lines[0], lines[0]
    assert what in lines[0]
    assert "ready" not in res.stdout
    assert BAD_PAN not in res.stderr + res.stdout   # a PAN is named masked, if at all


def test_up_refuses_a_missing_file(workdir):
    res = _cli("up", "-c", str(workdir / "no-such-network.toml"), cwd=workdir)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert "no-such-network.toml" in res.stderr
    assert "ready" not in res.stdout


def test_check_describes_a_good_file_without_secrets(workdir, good_text):
    path = workdir / "good.toml"
    path.write_text(good_text)
    res = _cli("check", "-c", str(path), cwd=workdir)
    assert res.returncode == 0, res.stderr
    assert re.search(r"ok: 3 banks, 6 merchants, 11 terminals, 13 cards", res.stdout), res.stdout
    assert GOOD_PAN not in res.stdout
    assert "F84A25A2491A40516EC40410343B619B" not in res.stdout      # POS00001's TPK
