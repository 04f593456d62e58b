"""Board export: the merged checkpoint rewritten for MindNLP 0.4.1, checked against transformers on the tiny model."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stages.board_export import export, rename_weights
from stages.common import StageError
from tests.board_plugin import BOARD_PYTHON, REPO, image_bytes, require_board_python

PROMPT = "이 이미지를 한국어로 한 문장으로 설명해 주세요."
MAX_NEW_TOKENS = 8


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_export_applies_fixes(tiny_model_dir: Path, tmp_path: Path) -> None:
    before = _tree_hashes(tiny_model_dir)
    out = tmp_path / "board"

    changes = export(tiny_model_dir, out)

    assert _tree_hashes(tiny_model_dir) == before, "the merged export must not change"
    assert changes
    source = json.loads((tiny_model_dir / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert "text_config" not in config
    assert "rope_parameters" not in config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert config[key] == source["text_config"][key], key
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}
    assert config["rope_theta"] == source["text_config"]["rope_parameters"]["rope_theta"]
    merges = json.loads((out / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (56 * 56, 28 * 28 * 1280)
    assert not (out / "processor_config.json").exists()
    template = json.loads((out / "chat_template.json").read_text())["chat_template"]
    assert template == (tiny_model_dir / "chat_template.jinja").read_text()
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "extra_special_tokens" not in tokenizer_config
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert json.loads((out / "board_export.json").read_text())["changes"] == changes


def test_export_of_export_changes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    export(tiny_model_dir, first)

    assert export(first, tmp_path / "second") == []


def test_export_renames_new_weight_layout(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    merged = tmp_path / "merged"
    merged.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name != "model.safetensors":
            (merged / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    renamed = {}
    for name, value in tensors.items():
        if name.startswith("model."):
            name = "model.language_model." + name[len("model.") :]
        elif name.startswith("visual."):
            name = "model." + name
        renamed[name] = value
    save_file(renamed, str(merged / "model.safetensors"), metadata={"format": "pt"})

    changes = export(merged, tmp_path / "board")

    assert any("tensors renamed" in change for change in changes)
    back = load_file(str(tmp_path / "board" / "model.safetensors"))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value)


def test_rename_keeps_unchanged_file_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    dest = tmp_path / "copy.safetensors"

    assert rename_weights(tiny_model_dir / "model.safetensors", dest) == 0
    assert dest.read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_merge_with_space_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    for path in tiny_model_dir.iterdir():
        (merged / path.name).write_bytes(path.read_bytes())
    tokenizer = json.loads((merged / "tokenizer.json").read_text())
    tokenizer["model"]["merges"][0] = ["a b", "c"]
    (merged / "tokenizer.json").write_text(json.dumps(tokenizer))

    with pytest.raises(StageError, match="contains a space"):
        export(merged, tmp_path / "board")
    assert not (tmp_path / "board").exists()


def _truncate_half(shard: Path) -> None:
    with shard.open("r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)


def _append_byte(shard: Path) -> None:
    with shard.open("ab") as handle:
        handle.write(b"\0")


def _garble_header(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[8] = ord("#")
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate_half,
        _append_byte,
        _garble_header,
        lambda shard: shard.write_bytes(b"\0" * 5),
        lambda shard: shard.write_bytes(struct.pack("<Q", 1 << 40)),
    ],
    ids=["truncated", "trailing-byte", "header-not-json", "5-bytes", "header-past-end"],
)
def test_broken_shard_rejected(corrupt, tiny_model_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    corrupt(merged / "model.safetensors")

    with pytest.raises(StageError, match="model.safetensors: invalid safetensors file") as caught:
        export(merged, tmp_path / "board")
    assert "dvc repro -f merge" in str(caught.value)
    assert not (tmp_path / "board").exists()


def _split_into_index(merged: Path, second_shard: str) -> None:
    """Rename the weights to a first shard and write an index mapping every other tensor to ``second_shard``."""
    first = merged / "model-00001-of-00002.safetensors"
    (merged / "model.safetensors").rename(first)
    with first.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        names = [name for name in json.loads(handle.read(length)) if name != "__metadata__"]
    weight_map = {name: first.name if i % 2 == 0 else second_shard for i, name in enumerate(names)}
    (merged / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_index_missing_shard_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    _split_into_index(merged, "model-00002-of-00002.safetensors")

    with pytest.raises(StageError, match="model-00002-of-00002.safetensors, which is not found") as caught:
        export(merged, tmp_path / "board")
    assert "dvc repro -f merge" in str(caught.value)
    assert not (tmp_path / "board").exists()


def test_index_tensor_not_in_shard_rejected(tiny_model_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    # The second shard exists but contains none of the tensors the index maps to it.
    empty = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (merged / "model-00002-of-00002.safetensors").write_bytes(struct.pack("<Q", len(empty)) + empty)
    _split_into_index(merged, "model-00002-of-00002.safetensors")

    with pytest.raises(StageError, match="model-00002-of-00002.safetensors, which does not contain it"):
        export(merged, tmp_path / "board")


def test_sharded_export_passes(tiny_model_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, merged)
    _split_into_index(merged, "model-00001-of-00002.safetensors")

    export(merged, tmp_path / "board")

    assert (tmp_path / "board" / "model-00001-of-00002.safetensors").is_file()


def test_export_cli_reports_missing_input(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), "-m", "stages.board_export", str(tmp_path / "none"), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip

    assert result.returncode == 1
    assert "config.json not found" in result.stderr


# --------------------------------------------------------------------------- MindNLP against transformers


def _transformers_tokens(model_dir: Path, image_path: Path) -> list[int]:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def _mindnlp_tokens(model_dir: Path, requests: Path, *flags: str) -> dict[str, list[int]]:
    require_board_python()
    result = subprocess.run(
        [str(BOARD_PYTHON), "-u", str(REPO / "deploy" / "infer.py"), "--model", str(model_dir), "--requests",
         str(requests), "--device", "CPU", "--max-new-tokens", str(MAX_NEW_TOKENS), *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return {r["id"]: r["token_ids"] for r in records if r["type"] == "answer"}


def _write_requests(folder: Path, sizes: list[tuple[int, int]]) -> tuple[Path, list[Path]]:
    folder.mkdir(parents=True)
    images = []
    lines = []
    for i, size in enumerate(sizes):
        path = folder / f"{i}.jpg"
        path.write_bytes(image_bytes(i, size))
        images.append(path)
        lines.append(json.dumps({"id": str(i), "image": path.name, "prompt": PROMPT}, ensure_ascii=False))
    requests = folder / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return requests, images


@pytest.mark.slow
def test_mindnlp_matches_transformers(tiny_model_dir: Path, board_model_dir: Path, tmp_path: Path) -> None:
    requests, images = _write_requests(tmp_path / "requests", [(84, 56), (140, 112)])

    board = _mindnlp_tokens(board_model_dir, requests)

    for i, image in enumerate(images):
        expected = _transformers_tokens(tiny_model_dir, image)
        assert len(expected) == MAX_NEW_TOKENS
        assert board[str(i)] == expected, f"image {i}"


@pytest.mark.slow
def test_ascend_workaround_path_matches_transformers(tiny_model_dir: Path, board_model_dir: Path, tmp_path: Path) -> None:
    """The 310B code path (padding, int32 ids, 2-D matmuls, fixed template), run on the CPU, gives the same tokens.

    The workarounds resize images to 336x336, so the image is made that size for both sides.
    """
    requests, images = _write_requests(tmp_path / "requests", [(336, 336)])

    board = _mindnlp_tokens(board_model_dir, requests, "--ascend-workarounds")

    assert board["0"] == _transformers_tokens(tiny_model_dir, images[0])


@pytest.mark.slow
def test_llamafactory_export_matches_transformers(merged_model_dir: Path, tmp_path: Path) -> None:
    """The merge stage's real LLaMA-Factory export, after board_export, gives transformers' tokens in MindNLP."""
    board = tmp_path / "board"
    export(merged_model_dir, board)
    requests, images = _write_requests(tmp_path / "requests", [(112, 84)])

    tokens = _mindnlp_tokens(board, requests)

    assert tokens["0"] == _transformers_tokens(merged_model_dir, images[0])
