"""The Makefile's entry points: ``make help`` lists them, and its PATH makes the venv's ``python`` the one dvc.yaml runs.

These read the Makefile only and install nothing. A fresh-clone run of
``make repro`` builds both venvs (minutes, about 10 GB), which is too slow
and too large for the suite, so it is checked by hand.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGETS = ("help", "install", "install-board", "sshd", "board", "board-stop", "repro", "test", "test-fast", "clean")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make; not found on PATH")


def _make(*args: str, makefile_extra: str | None = None) -> subprocess.CompletedProcess:
    command = ["make", "--no-print-directory", "-f", "Makefile"]
    if makefile_extra is not None:
        command += ["-f", "-"]
    return subprocess.run([*command, *args], cwd=REPO, input=makefile_extra or "", capture_output=True, text=True, timeout=60)


def test_make_help_lists_targets() -> None:
    result = _make("help")
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}

    assert result.returncode == 0, result.stderr
    for target in TARGETS:
        assert target in listed, f"`make help` does not list {target}"


def test_make_default_goal_is_help() -> None:
    assert _make().stdout == _make("help").stdout


def test_make_path_resolves_venv_python() -> None:
    # A throwaway target that prints which `python` the Makefile's exported PATH finds.
    result = _make("which-python", makefile_extra="which-python:\n\t@command -v python\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(REPO / ".venv" / "bin" / "python")
