"""The deploy stage end to end on the sshd stand-in with real MindNLP, plus its target and output helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from stages.common import StageError
from stages.config import DeployParams
from stages.deploy import deploy, percentile, resolve_target
from tests.board_plugin import REPO, current_release, make_params, write_script

GOOD_INFER = """
import json, sys
requests = [json.loads(line) for line in open("samples/requests.jsonl", encoding="utf-8")]
print(json.dumps({"type": "load", "device": "CPU", "dtype": "float32", "load_s": 0.1, "import_s": 0.2,
                  "python": "3.9", "mindspore": "x", "mindnlp": "y", "error": None}), flush=True)
for request in requests:
    print(json.dumps({"type": "answer", "id": request["id"], "output": request["prompt"][:5], "latency_s": 0.5,
                      "new_tokens": 3, "tokens_per_s": 6.0, "error": None}), flush=True)
"""


def _params_file(path: Path, params: DeployParams) -> Path:
    path.write_text(yaml.safe_dump({"deploy": asdict(params)}, allow_unicode=True), encoding="utf-8")
    return path


def _deploy_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.deploy", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_deploy_stage_answers_with_mindnlp(board_standin, remote_dir, board_model_dir, deploy_dataset_dir, tmp_path) -> None:
    params = _params_file(tmp_path / "params.yaml", make_params(board_standin, remote_dir))
    out = tmp_path / "deploy"
    metrics_path = tmp_path / "metrics.json"

    first = _deploy_cli(board_model_dir, deploy_dataset_dir, out, "--params", params, "--metrics", metrics_path)

    assert first.returncode == 0, first.stderr[-3000:]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2
    for row, index in zip(answers, (1, 2), strict=True):
        assert row["img_id"] == f"{index:064x}"
        assert row["reference"] == f"시장에서 상인이 과일을 팔고 있다 {index - 1}."
        assert row["prompt"] == "이 이미지를 한국어로 한 문장으로 설명해 주세요."
        assert row["error"] is None
        assert isinstance(row["answer"], str)
        assert row["new_tokens"] > 0
    metrics = json.loads(metrics_path.read_text())
    assert metrics["failed"] == 0
    assert metrics["samples"] == 2
    assert metrics["load_s"] > 0
    assert metrics["versions"]["mindnlp"] == "0.4.1"
    assert metrics["dtype"] == "float32"
    assert 0 < metrics["latency_s"]["p50"] <= metrics["latency_s"]["p95"]
    assert metrics["transfer"]["bytes_sent"] == metrics["transfer"]["bytes_total"] > 0
    release = metrics["release"]
    assert current_release(remote_dir) == release

    second = _deploy_cli(board_model_dir, deploy_dataset_dir, out, "--params", params, "--metrics", metrics_path)

    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads(metrics_path.read_text())
    assert again["release"] == release
    assert again["transfer"]["bytes_sent"] == 0
    assert again["transfer"]["objects_uploaded"] == 0
    assert current_release(remote_dir) == release

    status = _deploy_cli("--status", "--params", params)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["current"] == release
    rollback = _deploy_cli("--rollback", "--params", params)
    assert rollback.returncode == 1
    assert "no previous release" in rollback.stderr
    assert current_release(remote_dir) == release


def test_remote_dir_is_quoted(board_standin, board_conn, remote_dir, deploy_dataset_dir, tmp_path) -> None:
    """A release folder with spaces, quotes and $(...) in its name is used literally, never run."""
    odd = remote_dir / "it's a $(touch pwned) dir"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    script = write_script(tmp_path / "infer.py", GOOD_INFER)

    metrics = deploy(make_params(board_standin, odd), model, deploy_dataset_dir, tmp_path / "out",
                     tmp_path / "metrics.json", script, tmp_path / "none.json")  # fmt: skip

    assert metrics["failed"] == 0
    assert current_release(odd) == metrics["release"]
    assert not (REPO / "pwned").exists()
    assert not (Path.home() / "pwned").exists()


# --------------------------------------------------------------------------- target and helpers


def test_empty_params_filled_from_standin(tmp_path: Path) -> None:
    record = {"host": "127.0.0.1", "port": 2222, "user": "alice", "remote_dir": "/srv/board", "python": "/venv/bin/python"}
    standin = tmp_path / "standin.json"
    standin.write_text(json.dumps(record))

    target = resolve_target(DeployParams(), standin)

    assert (target.board.user, target.remote_dir, target.python) == ("alice", "/srv/board", "/venv/bin/python")
    explicit = resolve_target(DeployParams(user="bob", remote_dir="/data", python="/usr/bin/python3.9"), standin)
    assert (explicit.board.user, explicit.remote_dir, explicit.python) == ("bob", "/data", "/usr/bin/python3.9")


def test_empty_params_for_real_board_rejected(tmp_path: Path) -> None:
    standin = tmp_path / "standin.json"
    standin.write_text(json.dumps({"host": "127.0.0.1", "port": 2222, "user": "a", "remote_dir": "/r", "python": "/p"}))

    with pytest.raises(StageError, match="`deploy.remote_dir` is empty"):
        resolve_target(DeployParams(host="192.168.1.20", port=22, python="/p"), standin)
    with pytest.raises(StageError, match="make board"):
        resolve_target(DeployParams(), tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([1.0], 95, 1.0), ([1.0, 2.0], 50, 1.5), ([3.0, 1.0, 2.0, 4.0], 50, 2.5), ([1.0, 2.0, 3.0, 4.0, 5.0], 95, 4.8)],
)
def test_percentile_interpolates(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)
