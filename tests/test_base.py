"""Tests for stages.base: the tiny model, hub errors offline, local copies."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stages import base
from stages.common import StageError

REPO = Path(__file__).resolve().parent.parent


def _write_params(path: Path, section: str) -> Path:
    path.write_text(section, encoding="utf-8")
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every DNS lookup or connect to a host other than loopback fail, and record the attempts."""
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            attempts.append(f"getaddrinfo {host}")
            raise OSError(f"test blocked the DNS lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1"):
            attempts.append(f"connect {address}")
            raise OSError(f"test blocked a connection to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def test_tiny_rebuild_byte_identical(tmp_path: Path) -> None:
    params = _write_params(tmp_path / "params.yaml", "base:\n  source: tiny\n  tiny_seed: 3\n")
    out = tmp_path / "models" / "base"
    subprocess.run(
        [sys.executable, "-m", "stages.base", str(out), "--params", str(params)], cwd=REPO, check=True, capture_output=True
    )
    again = base.build_tiny_model(tmp_path / "again", seed=3)

    first, second = _files(out), _files(again)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two builds with the same seed"
    # atomic_path leaves no temporary sibling behind.
    assert sorted(p.name for p in out.parent.iterdir()) == ["base"]


def test_tiny_seed_changes_weights(tmp_path: Path) -> None:
    one = base.build_tiny_model(tmp_path / "one", seed=0)
    two = base.build_tiny_model(tmp_path / "two", seed=1)

    assert (one / "model.safetensors").read_bytes() != (two / "model.safetensors").read_bytes()
    assert (one / "tokenizer.json").read_bytes() == (two / "tokenizer.json").read_bytes()


def test_tiny_loads_and_generates(tiny_model_dir: Path) -> None:
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    tokenizer = processor.tokenizer
    for token in base.SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) == base.special_token_id(token)
    assert model.config.image_token_id == base.special_token_id("<|image_pad|>")
    text_config = model.config.text_config
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    assert sum(text_config.rope_parameters["mrope_section"]) == head_dim // 2

    caption = "서울 광장에서 사람들이 춤을 추고 있다. A crowd in Seoul."
    assert tokenizer.decode(tokenizer(caption).input_ids) == caption

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "이 사진을 설명해 주세요."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    inputs = processor(text=[prompt], images=[Image.new("RGB", (56, 84), (200, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        second = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert first.shape[1] > inputs["input_ids"].shape[1]
    assert torch.equal(first, second)


def test_modelscope_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_only: list[str]
) -> None:
    # A closed loopback port: the client gets "connection refused" without any traffic leaving the machine.
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MODELSCOPE_REPO_TREE_PAGE_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("MODELSCOPE_API_MAX_RETRIES", "1")
    monkeypatch.setenv("MODELSCOPE_DOWNLOAD_MAX_RETRIES", "0")
    monkeypatch.setenv("MODELSCOPE_DOWNLOAD_INTRA_CLOUD", "false")
    params = base.BaseParams(source="modelscope", model_id="Qwen/Qwen2-VL-2B-Instruct", revision="v0-test")
    out = tmp_path / "base"

    with pytest.raises(StageError) as error:
        base.materialise(params, out)

    message = str(error.value)
    assert "base.source modelscope (Qwen/Qwen2-VL-2B-Instruct@v0-test)" in message
    assert "download failed" in message
    assert "base.local_path" in message
    assert not out.exists()
    assert loopback_only == []


def test_huggingface_offline_error(tmp_path: Path, loopback_only: list[str]) -> None:
    # conftest sets HF_HUB_OFFLINE=1, so huggingface_hub fails before opening a socket.
    params_file = _write_params(
        tmp_path / "params.yaml", "base:\n  source: huggingface\n  model_id: Qwen/Qwen2-VL-2B-Instruct\n"
        "  revision: 895c3a49bc3fa70a340399125c650a463535e71c\n"
    )
    out = tmp_path / "base"

    code = base.main([str(out), "--params", str(params_file)])

    assert code == 1
    with pytest.raises(StageError, match=r"huggingface \(Qwen/Qwen2-VL-2B-Instruct@895c3a4.*download failed"):
        base.materialise(base.load_params(params_file).base, out)
    assert not out.exists()
    assert loopback_only == []


@pytest.mark.parametrize(("hub", "module"), [("modelscope", "modelscope"), ("huggingface", "huggingface_hub")])
def test_hub_download_moved_into_place(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, hub: str, module: str
) -> None:
    import importlib

    calls = []

    def fake_snapshot_download(model_id: str, revision: str, local_dir: str) -> str:
        # Stands in for the hub: the files of a real checkpoint plus the client's hidden bookkeeping.
        calls.append((model_id, revision))
        shutil.copytree(tiny_model_dir, local_dir)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        (Path(local_dir) / ".msc").write_text("{}", encoding="utf-8")
        return local_dir

    monkeypatch.setattr(importlib.import_module(module), "snapshot_download", fake_snapshot_download)
    out = tmp_path / "base"

    base.materialise(base.BaseParams(source=hub, model_id="Qwen/Qwen2-VL-2B-Instruct", revision="abc123"), out)

    assert calls == [("Qwen/Qwen2-VL-2B-Instruct", "abc123")]
    assert _files(out) == _files(tiny_model_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_local_copy(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = base.BaseParams(source="local", local_path=str(tiny_model_dir))
    out = tmp_path / "base"

    base.materialise(params, out)

    assert _files(out) == _files(tiny_model_dir)


def test_local_rejects_other_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    other = tmp_path / "llama"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "llama"
    (other / "config.json").write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(StageError, match=r"model_type 'llama', expected 'qwen2_vl'"):
        base.materialise(base.BaseParams(source="local", local_path=str(other)), tmp_path / "base")
    with pytest.raises(StageError, match=r"folder not found"):
        base.materialise(base.BaseParams(source="local", local_path=str(tmp_path / "nowhere")), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_local_rejects_missing_processor(tmp_path: Path, tiny_model_dir: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (partial / name).write_bytes((tiny_model_dir / name).read_bytes())

    with pytest.raises(StageError, match=r"has no image processor"):
        base.materialise(base.BaseParams(source="local", local_path=str(partial)), tmp_path / "base")


def _truncate_weights(folder: Path) -> None:
    with (folder / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)


def _index_missing_shard(folder: Path) -> None:
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_truncate_weights, "model.safetensors: invalid safetensors file"),
        (_index_missing_shard, "model-00002-of-00002.safetensors, which is not found"),
    ],
    ids=["truncated", "index-missing-shard"],
)
def test_local_rejects_broken_weights(tmp_path: Path, tiny_model_dir: Path, corrupt, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    corrupt(broken)

    with pytest.raises(StageError, match=message) as caught:
        base.materialise(base.BaseParams(source="local", local_path=str(broken)), tmp_path / "base")
    assert "base.local_path" in str(caught.value)
    assert "copy or download it again" in str(caught.value)
    assert not (tmp_path / "base").exists()


def test_hub_rejects_truncated_weights(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def fake_snapshot_download(model_id: str, revision: str, local_dir: str) -> str:
        # Stands in for a download that stopped partway through the weights.
        shutil.copytree(tiny_model_dir, local_dir)
        _truncate_weights(Path(local_dir))
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    params = base.BaseParams(source="huggingface", model_id="Qwen/Qwen2-VL-2B-Instruct", revision="abc123")

    with pytest.raises(StageError, match="model.safetensors: invalid safetensors file") as caught:
        base.materialise(params, tmp_path / "base")
    assert "base.source huggingface" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
