"""Tests for stages.merge: LLaMA-Factory export of the tiny base with a trained LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages import merge
from tests.model_fixtures import run_stage, write_params


def _generate(model, processor, max_new_tokens: int = 12):
    import torch
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "이 사진을 설명해 주세요."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (84, 56), (30, 120, 200))], return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        logits = model(**inputs).logits
    return output[0, inputs["input_ids"].shape[1] :].tolist(), logits


@pytest.mark.slow
def test_merged_generates_like_base_plus_adapter(
    tiny_model_dir: Path, trained_adapter_dir: Path, merged_model_dir: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(merged_model_dir)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    with_adapter = PeftModel.from_pretrained(base, trained_adapter_dir).eval()
    merged = AutoModelForImageTextToText.from_pretrained(merged_model_dir).eval()

    adapter_tokens, adapter_logits = _generate(with_adapter, processor)
    merged_tokens, merged_logits = _generate(merged, processor)
    with with_adapter.disable_adapter():
        base_tokens, base_logits = _generate(with_adapter, processor)

    assert merged_tokens == adapter_tokens
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    # The adapter must have changed something, or the comparison above proves nothing.
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-5)


@pytest.mark.slow
def test_merged_checkpoint_layout(merged_model_dir: Path) -> None:
    names = {p.name for p in merged_model_dir.iterdir()}

    assert "model.safetensors" in names
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"} <= names
    config = json.loads((merged_model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "qwen2_vl"
    assert config["dtype"] == "float32"
    ran = yaml.safe_load((merged_model_dir / merge.CONFIG_NAME).read_text(encoding="utf-8"))
    assert ran["export_size"] == 5
    assert ran["infer_dtype"] == "float32"
    assert ran["export_dir"] == str(merged_model_dir)
    # atomic_path renamed its temporary folder into place and left nothing beside it.
    assert sorted(p.name for p in merged_model_dir.parent.iterdir()) == ["merged", "params.yaml"]


def test_missing_adapter_rejected(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml", merge={"export_size": 2})

    process = run_stage("merge", tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", "--params", params, check=False)

    assert process.returncode == 1
    assert f"{tmp_path / 'adapter' / 'adapter_config.json'} not found" in process.stderr
    assert "dvc repro train" in process.stderr
    assert not (tmp_path / "merged").exists()


def test_base_dtype_from_config(tmp_path: Path) -> None:
    for written, expected in (({"dtype": "bfloat16"}, "bfloat16"), ({"torch_dtype": "float16"}, "float16"), ({}, "float32")):
        (tmp_path / "config.json").write_text(json.dumps(written), encoding="utf-8")
        assert merge.base_dtype(tmp_path) == expected
