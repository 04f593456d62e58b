"""Fixtures for the deploy tests: a real sshd board stand-in, a board checkpoint, a tiny test split.

Loaded through ``pytest_plugins`` in ``tests/conftest.py``. The stand-in is
``tools/board_standin.py`` started once per session on a free 127.0.0.1 port
with its state in a temporary folder; each test deploys into its own folder
under the stand-in's board root, so tests do not see each other's releases.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.board_ssh import BoardConnection, BoardTarget, connect
from stages.config import DeployParams
from tools import board_standin as standin_tool
from tools.board_standin import Standin

REPO = Path(__file__).resolve().parent.parent
BOARD_PYTHON = REPO / ".venv-board" / "bin" / "python"
PROMPT = "<image>이 이미지를 한국어로 한 문장으로 설명해 주세요."


def require_board_python() -> None:
    if not BOARD_PYTHON.exists():
        pytest.fail(f"{BOARD_PYTHON} not found; build the board venv with `make install-board`.")


@pytest.fixture(scope="session")
def board_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    """A running sshd stand-in on a free port (state in a temp folder); stopped at the end of the session."""
    require_board_python()
    state = tmp_path_factory.mktemp("standin") / "board"
    for attempt in range(3):
        try:
            standin = standin_tool.start(state, standin_tool.free_port(), BOARD_PYTHON)
            break
        except standin_tool.StandinError:
            # Another process can take the free port between the probe and sshd's bind.
            if attempt == 2:
                raise
    yield standin
    standin_tool.stop(state)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:80]


@pytest.fixture
def remote_dir(board_standin: Standin, request: pytest.FixtureRequest) -> Path:
    """A fresh release root on the stand-in for this test."""
    path = Path(board_standin.remote_dir) / _slug(request.node.name)
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return path


def make_params(standin: Standin, remote_dir: Path, **overrides: object) -> DeployParams:
    """Deploy params aimed at ``standin``, with ``remote_dir`` and the given overrides."""
    values = {
        "host": standin.host,
        "port": standin.port,
        "user": standin.user,
        "key_file": standin.key_file,
        "known_hosts": standin.known_hosts,
        "remote_dir": str(remote_dir),
        "python": standin.python,
        "samples": 2,
        "max_new_tokens": 4,
        "connect_timeout": 10.0,
        "transfer_timeout": 30.0,
        "run_timeout": 120.0,
    }
    values.update(overrides)
    return DeployParams(**values)


def make_target(standin: Standin, **overrides: object) -> BoardTarget:
    values = {
        "host": standin.host,
        "port": standin.port,
        "user": standin.user,
        "key_file": standin.key_file,
        "known_hosts": Path(standin.known_hosts),
        "connect_timeout": 10.0,
        "transfer_timeout": 30.0,
    }
    values.update(overrides)
    return BoardTarget(**values)


@pytest.fixture
def board_conn(board_standin: Standin) -> Iterator[BoardConnection]:
    """A logged-in connection to the stand-in."""
    with connect(make_target(board_standin)) as conn:
        yield conn


@pytest.fixture(scope="session")
def board_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny Qwen2-VL run through ``stages.board_export``; treat it as read-only."""
    from stages.board_export import export

    out = tmp_path_factory.mktemp("board_model") / "board"
    export(tiny_model_dir, out)
    return out


def image_bytes(index: int, size: tuple[int, int] = (84, 56)) -> bytes:
    from PIL import Image

    image = Image.new("RGB", size)
    pixels = image.load()
    for x in range(size[0]):
        for y in range(size[1]):
            pixels[x, y] = ((x * 9 + index * 50) % 256, (y * 7 + index * 30) % 256, (x * y + index * 11) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def deploy_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split-stage style dataset with 3 test samples (``test/part-00000.parquet``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("deploy_dataset") / "dataset"
    (root / "test").mkdir(parents=True)
    rows = []
    for i in range(3):
        caption = f"시장에서 상인이 과일을 팔고 있다 {i}."
        rows.append(
            {
                "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": caption}],
                "images": [{"bytes": image_bytes(i), "path": None}],
                "img_id": f"{i + 1:064x}",
                "line": i + 1,
                "caption": caption,
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), root / "test" / "part-00000.parquet")
    return root


def write_script(path: Path, body: str) -> Path:
    """Write a stand-in ``infer.py`` (runs on the board Python) and return its path."""
    path.write_text(body, encoding="utf-8")
    return path


def processes_matching(pattern: str) -> list[str]:
    """Return ``pgrep -af`` lines for ``pattern`` (an empty list when nothing matches)."""
    result = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if line.strip()]


def wait_until(condition, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def current_release(remote_dir: Path) -> str | None:
    link = remote_dir / "current"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def read_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))
