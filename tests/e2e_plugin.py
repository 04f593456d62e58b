"""Fixtures for the end-to-end tests: one full ``dvc repro`` in a temporary copy of the repository.

Loaded through ``pytest_plugins`` in ``tests/conftest.py``. ``pipeline_repo``
copies the files git tracks in this checkout (their working-tree content) into
a temporary folder, commits them there as one commit, and runs the whole
pipeline once with the real ``dvc`` CLI of this venv. The experiment,
reproducibility and storage tests share that run, so the suite pays for one
full pipeline. Nothing runs in the checkout itself.

When ``dvc.yaml`` has a ``deploy`` stage, the copy gets its own board stand-in
(``tools/board_standin.py``, state in the copy's ``.board/``) on a free port,
written into the copy's ``deploy.port``, as ``make repro`` does for a user.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# The venv that runs the tests. Its bin folder goes first on PATH, as under `make`
# or in an activated venv, so `dvc` and the `python` in dvc.yaml's cmds are this venv's.
VENV_BIN = Path(sys.executable).parent
BOARD_PYTHON = REPO / ".venv-board" / "bin" / "python"
FULL_REPRO_TIMEOUT_S = 1800
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "silu-pipeline tests",
    "GIT_AUTHOR_EMAIL": "tests@silu-pipeline.invalid",
    "GIT_COMMITTER_NAME": "silu-pipeline tests",
    "GIT_COMMITTER_EMAIL": "tests@silu-pipeline.invalid",
}

# Wall-clock seconds measured by the end-to-end tests, printed in pytest's terminal summary.
TIMINGS: dict[str, float] = {}


def record_timing(name: str, seconds: float) -> None:
    TIMINGS[name] = seconds


def pytest_terminal_summary(terminalreporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("end-to-end timings (wall seconds)")
    for name, seconds in TIMINGS.items():
        terminalreporter.write_line(f"{name:<48} {seconds:8.2f}")


# --------------------------------------------------------------------------- environment and copies


def pipeline_env(home: Path | None = None) -> dict[str, str]:
    """Return the environment for ``dvc`` and ``git`` runs: this venv first on PATH, offline, no proxies.

    ``home`` replaces HOME, so ``~/.ssh/config`` and ``~/.config/fsspec`` are the
    test's own. SSH agents and ``FSSPEC_*`` settings of the caller are removed.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ssh_auth_sock")
        and not name.startswith("FSSPEC_")
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_IDENTITY)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DVC_NO_ANALYTICS": "1",
            # One intra-op thread: the tiny model trains several times faster on a busy 2-core machine.
            "OMP_NUM_THREADS": "1",
        }
    )
    if home is not None:
        env["HOME"] = str(home)
    return env


def run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command with stdout and stderr merged into ``stdout``; on failure with ``check``, show its tail."""
    # No stdin: a password or passphrase prompt fails at once instead of waiting.
    process = subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and process.returncode != 0:
        raise AssertionError(f"`{' '.join(args)}` in {cwd} exited {process.returncode}:\n{process.stdout[-6000:]}")
    return process


def copy_checkout(dest: Path) -> Path:
    """Copy the files git tracks in this checkout (working-tree content) into ``dest``; return ``dest``."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, listing):
        source = REPO / os.fsdecode(name)
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree but not yet in git
        target = dest / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return dest


def set_param(params_file: Path, key: str, value: object) -> None:
    """Set ``section.name`` in a params.yaml by editing its line, so comments and layout stay as they are."""
    section, name = key.split(".", 1)
    lines = params_file.read_text(encoding="utf-8").splitlines(keepends=True)
    in_section = False
    for index, line in enumerate(lines):
        if re.match(r"^\S", line):
            in_section = line.startswith(f"{section}:")
            continue
        match = re.match(rf"^(\s+{re.escape(name)}:\s*)(\S+)(.*)$", line.rstrip("\n"))
        if in_section and match:
            lines[index] = f"{match.group(1)}{value}{match.group(3)}\n"
            params_file.write_text("".join(lines), encoding="utf-8")
            return
    raise KeyError(f"{key} not found in {params_file}")


def has_stage(repo: Path, name: str) -> bool:
    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    return name in stages


# --------------------------------------------------------------------------- stage bookkeeping

_RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)
_RESTORED = re.compile(r"^Stage '([^']+)' is cached - skipping run", re.MULTILINE)
_SKIPPED = re.compile(r"^Stage '([^']+)' didn't change, skipping", re.MULTILINE)


@dataclass(frozen=True)
class StageRuns:
    """Stages that ``dvc repro``/``dvc exp run`` ran (or restored from the run cache), and those it skipped."""

    ran: frozenset[str]
    skipped: frozenset[str]


def parse_stage_runs(output: str) -> StageRuns:
    ran = set(_RAN.findall(output)) | set(_RESTORED.findall(output))
    return StageRuns(frozenset(ran), frozenset(_SKIPPED.findall(output)))


def stage_graph(repo: Path, env: dict[str, str]) -> dict[str, set[str]]:
    """Return each stage's direct downstream stages, from ``dvc dag --dot``."""
    dot = run([str(VENV_BIN / "dvc"), "dag", "--dot"], repo, env).stdout
    graph: dict[str, set[str]] = {name: set() for name in re.findall(r'^"([^"]+)";$', dot, re.MULTILINE)}
    for upstream, downstream in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.MULTILINE):
        graph.setdefault(upstream, set()).add(downstream)
        graph.setdefault(downstream, set())
    return graph


def stages_affected_by(repo: Path, env: dict[str, str], key: str) -> set[str]:
    """Return the stages that declare param ``key`` and every stage downstream of them."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    owners = {name for name, stage in stages.items() if key in (stage.get("params") or [])}
    graph = stage_graph(repo, env)
    affected, pending = set(), list(owners)
    while pending:
        name = pending.pop()
        if name not in affected:
            affected.add(name)
            pending.extend(graph.get(name, ()))
    return affected


# --------------------------------------------------------------------------- the shared pipeline run


@dataclass
class PipelineRepo:
    """A temporary git+DVC copy of the repository whose committed HEAD is a finished ``dvc repro``."""

    path: Path
    env: dict[str, str]
    # The commit of the copied checkout, before the pipeline ran (HEAD is its child with the outputs).
    source_commit: str
    deploy_port: int | None = None
    standin_state: Path | None = None

    def dvc(self, *args: str, check: bool = True, timeout: float = FULL_REPRO_TIMEOUT_S) -> subprocess.CompletedProcess:
        return run([str(VENV_BIN / "dvc"), *args], self.path, self.env, check=check, timeout=timeout)

    def git(self, *args: str) -> str:
        return run(["git", *args], self.path, self.env).stdout

    def lock(self, rev: str | None = None) -> dict:
        """Return ``dvc.lock`` of the workspace, or of git revision ``rev``."""
        text = self.git("show", f"{rev}:dvc.lock") if rev else (self.path / "dvc.lock").read_text(encoding="utf-8")
        return yaml.safe_load(text)

    def reset(self) -> None:
        """Bring the workspace back to the committed run: params, lock, metrics and every DVC output."""
        self.git("checkout", "-q", "HEAD", "--", ".")
        self.git("clean", "-fdq")
        self.dvc("checkout", "--force", "-q")


def make_pipeline_copy(dest: Path, deploy_port: int | None) -> Path:
    """Copy the checkout to ``dest`` as a fresh git+DVC repository with ``deploy.port`` set, and commit it."""
    copy_checkout(dest)
    if deploy_port is not None:
        set_param(dest / "params.yaml", "deploy.port", deploy_port)
    env = pipeline_env()
    run(["git", "init", "-q", "-b", "main"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "commit", "-q", "-m", "Copy of the checkout under test"], dest, env)
    return dest


def start_standin(state: Path):
    """Start a board stand-in with its state in ``state`` on a free port; return its record."""
    from tools import board_standin

    if not BOARD_PYTHON.exists():
        pytest.fail(f"{BOARD_PYTHON} not found; build the board venv with `make install-board`.")
    for attempt in range(3):
        try:
            return board_standin.start(state, board_standin.free_port(), BOARD_PYTHON)
        except board_standin.StandinError:
            # Another process can take the free port between the probe and sshd's bind.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PipelineRepo]:
    """A copy of the checkout after one full ``dvc repro``, committed as HEAD; reset it before changing it."""
    path = tmp_path_factory.mktemp("pipeline") / "repo"
    standin = None
    standin_state = None
    if has_stage(REPO, "deploy"):
        standin_state = path / ".board"
        standin = start_standin(standin_state)
    try:
        make_pipeline_copy(path, standin.port if standin else None)
        env = pipeline_env()
        source_commit = run(["git", "rev-parse", "HEAD"], path, env).stdout.strip()
        repo = PipelineRepo(path, env, source_commit, standin.port if standin else None, standin_state)

        started = time.monotonic()
        repo.dvc("repro")
        record_timing("full dvc repro (fresh copy)", time.monotonic() - started)

        repo.git("add", "-A")
        repo.git("commit", "-q", "-m", "Baseline pipeline run")
        yield repo
    finally:
        if standin is not None:
            from tools import board_standin

            with contextlib.suppress(OSError):
                board_standin.stop(standin_state)
