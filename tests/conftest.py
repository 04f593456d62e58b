"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# huggingface_hub reads HF_HUB_OFFLINE once, when it is first imported. Test modules import
# transformers while pytest collects them, before any fixture runs, so set it here as well.
for _offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_offline] = "1"

# Model-stage fixtures (tiny dataset, trained adapter, merged model), shared across test files.
from tests.model_fixtures import merged_model_dir, tiny_dataset_dir, trained_adapter_dir  # noqa: E402, F401

REPO = Path(__file__).resolve().parent.parent

# The loopback HTTP and HTTPS server fixtures of tests/conftest_http.py, for the download tests.
pytest_plugins = ["tests.conftest_http"]
# Deploy-side fixtures: the sshd board stand-in, a board checkpoint, a tiny test split.
pytest_plugins.append("tests.board_plugin")
# End-to-end fixtures: one full `dvc repro` in a temporary copy of the repository, shared by the e2e tests.
pytest_plugins.append("tests.e2e_plugin")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Strip proxy settings so every request stays on the loopback servers the tests start."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random Qwen2-VL checkpoint (``stages.base.build_tiny_model``, seed 0), built once; treat it as read-only."""
    from stages.base import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "base", seed=0)
