"""deploy/infer.py and deploy/board_ops.py on the board's Python 3.9: output records and exit status."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.board_plugin import BOARD_PYTHON, REPO, image_bytes, require_board_python

INFER = REPO / "deploy" / "infer.py"


def _run_infer(model: Path, requests: Path, *flags: str) -> subprocess.CompletedProcess:
    require_board_python()
    return subprocess.run(
        [str(BOARD_PYTHON), "-u", str(INFER), "--model", str(model), "--requests", str(requests),
         "--device", "CPU", "--max-new-tokens", "4", *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _records(stdout: str) -> list[dict]:
    # Every stdout line must be a record: library output goes to stderr.
    return [json.loads(line) for line in stdout.splitlines()]


def test_board_code_compiles_on_python39() -> None:
    require_board_python()
    version = subprocess.run([str(BOARD_PYTHON), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    assert version.stdout.strip() == "(3, 9)"
    for script in ("infer.py", "board_ops.py"):
        result = subprocess.run(
            [str(BOARD_PYTHON), "-c", "import ast, sys; ast.parse(open(sys.argv[1]).read(), feature_version=(3, 9))",
             str(REPO / "deploy" / script)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_board_ops_rejects_bad_manifest(tmp_path: Path) -> None:
    require_board_python()
    (tmp_path / "objects").mkdir()
    (tmp_path / "objects" / ("0" * 64)).write_text("payload")
    args = json.dumps({"remote_dir": str(tmp_path), "release": "r1", "files": {"../escape": "0" * 64}})
    result = subprocess.run(
        [str(BOARD_PYTHON), "-", "assemble", args], input=(REPO / "deploy" / "board_ops.py").read_text(),
        capture_output=True, text=True,
    )  # fmt: skip

    assert result.returncode == 1
    assert "invalid release path '../escape'" in result.stderr
    assert not (tmp_path / "releases" / "escape").exists()
    assert not (tmp_path / "escape").exists()


@pytest.mark.slow
def test_infer_answers_and_reports_failures(board_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.jpg").write_bytes(image_bytes(0))
    (tmp_path / "images" / "2.jpg").write_bytes(b"not an image")
    lines = [
        {"id": "good", "image": "images/0.jpg", "prompt": "사진에 무엇이 보이나요?"},
        {"id": "missing", "image": "images/1.jpg", "prompt": "Describe."},
        {"id": "broken", "image": "images/2.jpg", "prompt": "Describe."},
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")

    result = _run_infer(board_model_dir, requests)

    assert result.returncode == 1, result.stderr[-2000:]
    records = _records(result.stdout)
    load, *answers = records
    assert load["type"] == "load"
    assert load["error"] is None
    assert (load["python"], load["mindnlp"], load["device"], load["dtype"]) == ("3.9.18", "0.4.1", "CPU", "float32")
    assert load["mindspore"].startswith("2.5.0")
    assert load["load_s"] > 0
    assert [a["id"] for a in answers] == ["good", "missing", "broken"]
    good, missing, broken = answers
    assert good["error"] is None
    assert good["new_tokens"] == len(good["token_ids"]) > 0
    assert isinstance(good["output"], str)
    assert good["latency_s"] > 0
    assert good["tokens_per_s"] > 0
    assert missing["error"].startswith("FileNotFoundError")
    assert broken["error"].startswith("UnidentifiedImageError")


@pytest.mark.slow
def test_infer_load_failure_exits_2(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    requests = tmp_path / "requests.jsonl"
    requests.write_text("")

    result = _run_infer(model, requests)

    assert result.returncode == 2
    (load,) = _records(result.stdout)
    assert load["type"] == "load"
    assert load["error"]
    assert "Traceback" in result.stderr


def test_infer_rejects_bad_arguments(tmp_path: Path) -> None:
    result = _run_infer(tmp_path, tmp_path / "requests.jsonl", "--max-new-tokens", "0")

    assert result.returncode == 2
    assert "--max-new-tokens must be >= 1" in result.stderr
