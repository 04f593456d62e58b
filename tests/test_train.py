"""Tests for stages.train: real LLaMA-Factory LoRA SFT of the tiny Qwen2-VL on CPU."""

from __future__ import annotations

import csv
import io
import json
import socket
from pathlib import Path

import pytest
import torch
import yaml

from stages import train
from stages.common import StageError
from stages.config import ConvertParams, load_params
from tests.model_fixtures import run_stage, write_params


def _loss_rows(metrics_dir: Path) -> list[float]:
    with open(metrics_dir / "plots" / "metrics" / "loss.tsv", encoding="utf-8") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle, delimiter="\t")]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_adapter_config_and_metrics(trained_adapter_dir: Path) -> None:
    metrics_dir = trained_adapter_dir.parent / "metrics"

    assert (trained_adapter_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((trained_adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["r"] == 4
    assert adapter_config["lora_alpha"] == 8
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    assert all(".language_model." in name for name in adapter_config["target_modules"])

    ran = yaml.safe_load((trained_adapter_dir / train.CONFIG_NAME).read_text(encoding="utf-8"))
    assert ran["lora_rank"] == 4
    assert ran["max_steps"] == 4
    assert ran["seed"] == 7
    assert ran["cutoff_len"] == ConvertParams().cutoff_len
    assert ran["image_max_pixels"] == 589_824
    assert ran["output_dir"] == str(trained_adapter_dir)
    assert ran["dataset"] == "silu_train"

    assert len(_loss_rows(metrics_dir)) == 4
    summary = json.loads((metrics_dir / "metrics.json").read_text(encoding="utf-8"))
    assert summary["train"]["global_step"] == 4
    assert summary["train"]["loss"] > 0
    logged = yaml.safe_load((metrics_dir / "params.yaml").read_text(encoding="utf-8"))
    assert logged["llamafactory"]["lora_rank"] == 4
    assert logged["llamafactory"]["model_name_or_path"].endswith("base")
    assert logged["dataset"]["train_samples"] == 8
    # DVCLiveCallback also logs the trainer's own arguments.
    assert logged["max_steps"] == 4
    # Inside a pipeline DVCLive must not write a dvc.yaml of its own.
    assert not (metrics_dir / "dvc.yaml").exists()
    assert not (metrics_dir.parent / "dvc.yaml").exists()


@pytest.mark.slow
def test_same_seed_bit_identical(
    tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path, trained_adapter_dir: Path
) -> None:
    params = write_params(tmp_path / "params.yaml")
    again = tmp_path / "adapter"
    run_stage("train", tiny_dataset_dir, tiny_model_dir, again, "--params", params, "--metrics", tmp_path / "metrics")

    first = (trained_adapter_dir / "adapter_model.safetensors").read_bytes()
    second = (again / "adapter_model.safetensors").read_bytes()
    assert first == second
    first_config = json.loads((trained_adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    second_config = json.loads((again / "adapter_config.json").read_text(encoding="utf-8"))
    assert sorted(first_config.pop("target_modules")) == sorted(second_config.pop("target_modules"))
    assert first_config == second_config

    merged = [tmp_path / "merged-1", tmp_path / "merged-2"]
    run_stage("merge", tiny_model_dir, trained_adapter_dir, merged[0], "--params", params)
    run_stage("merge", tiny_model_dir, again, merged[1], "--params", params)
    shards = sorted(p.name for p in merged[0].glob("*.safetensors"))
    assert shards == sorted(p.name for p in merged[1].glob("*.safetensors"))
    for name in shards:
        assert (merged[0] / name).read_bytes() == (merged[1] / name).read_bytes(), name


def test_cutoff_too_small_rejected(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    # The tiny dataset's samples are 98-111 tokens long, so 64 truncates every one of them.
    params = write_params(tmp_path / "params.yaml", convert={"cutoff_len": 64})
    out = tmp_path / "adapter"

    process = run_stage(
        "train", tiny_dataset_dir, tiny_model_dir, out, "--params", params, "--metrics", tmp_path / "m", check=False
    )

    assert process.returncode == 1
    assert "`convert.cutoff_len` is 64" in process.stderr
    assert "8 of 8 train samples are longer" in process.stderr
    assert "Running training" not in process.stderr
    assert not out.exists()
    assert not (tmp_path / "m").exists()


def test_cutoff_below_image_tokens() -> None:
    summary = train.DatasetSummary(
        samples=3,
        shards=["train/part-00000.parquet"],
        max_tokens=None,
        max_tokens_img_id=None,
        over_cutoff=0,
        max_image_tokens=40,
        max_image_tokens_img_id="ab12",
    )

    with pytest.raises(StageError) as error:
        train.check_cutoff(summary, ConvertParams(cutoff_len=32))

    message = str(error.value)
    assert "`convert.cutoff_len` is 32" in message
    assert "42 tokens that the image of sample ab12" in message
    assert "`convert.image_max_pixels`" in message
    train.check_cutoff(summary, ConvertParams(cutoff_len=42))


@pytest.mark.parametrize(
    ("width", "height", "max_pixels", "min_pixels"),
    [
        (56, 56, 589_824, 1024),
        (112, 84, 589_824, 1024),
        (3000, 2000, 589_824, 1024),  # downscaled by LLaMA-Factory first
        (3000, 2000, 200_000, 1024),
        (20, 300, 589_824, 1024),  # short side under 28 px
        (30, 30, 589_824, 4096),  # upscaled to image_min_pixels
        (6000, 25, 589_824, 1024),  # aspect ratio over 200
    ],
)
def test_image_tokens_match_llamafactory(
    tiny_model_dir: Path, width: int, height: int, max_pixels: int, min_pixels: int
) -> None:
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.hparams import ModelArguments
    from llamafactory.model import load_tokenizer
    from PIL import Image

    module = load_tokenizer(
        ModelArguments(model_name_or_path=str(tiny_model_dir), image_max_pixels=max_pixels, image_min_pixels=min_pixels)
    )
    plugin = get_mm_plugin("qwen2_vl", image_token="<|image_pad|>")
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    messages = [{"role": "user", "content": "<image>"}]
    expanded = plugin.process_messages(messages, [buffer.getvalue()], [], [], module["processor"])
    expected = expanded[0]["content"].count("<|image_pad|>")

    minimum, maximum = train.processor_pixel_limits(tiny_model_dir)
    assert train.image_token_count(width, height, max_pixels, min_pixels, minimum, maximum) == expected


def test_unknown_train_key_rejected(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml", train={"epoch": 3})

    process = run_stage(
        "train", tiny_dataset_dir, tiny_model_dir, tmp_path / "adapter", "--params", params, check=False
    )

    assert process.returncode == 1
    assert "Unknown key `train.epoch`" in process.stderr
    assert "Did you mean `train.epochs`?" in process.stderr
    assert not (tmp_path / "adapter").exists()


def test_unknown_template_rejected(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml", train={"template": "nonsense"})

    process = run_stage(
        "train", tiny_dataset_dir, tiny_model_dir, tmp_path / "adapter", "--params", params, check=False
    )

    assert process.returncode == 1
    assert "`train.template` is 'nonsense'" in process.stderr
    assert "qwen2_vl" in process.stderr
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_rejected(
    tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    # Hide any CUDA device, so the check runs the same on a machine with a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = load_params(write_params(tmp_path / "params.yaml", train={"precision": precision}))

    with pytest.raises(StageError, match=f"`train.precision` is '{precision}'") as caught:
        train.train(params, tiny_dataset_dir, tiny_model_dir, tmp_path / "adapter", tmp_path / "metrics")
    assert "`train.precision: fp32`" in str(caught.value)
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "metrics").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bf16_cli_on_cpu_rejected(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml", train={"precision": "bf16"})

    process = run_stage(
        "train", tiny_dataset_dir, tiny_model_dir, tmp_path / "adapter", "--params", params, check=False
    )

    assert process.returncode == 1
    assert "`train.precision` is 'bf16'" in process.stderr
    assert "use_cpu" not in process.stderr
    assert not (tmp_path / "adapter").exists()


def test_missing_dataset_info_rejected(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml")
    (tmp_path / "dataset").mkdir()

    process = run_stage(
        "train", tmp_path / "dataset", tiny_model_dir, tmp_path / "adapter", "--params", params, check=False
    )

    assert process.returncode == 1
    assert f"{tmp_path / 'dataset' / 'dataset_info.json'} not found" in process.stderr
    assert "dvc repro split" in process.stderr


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    # Two gloo processes with batch 2 see the same 4 samples per step as one process accumulating 2 batches.
    two = write_params(tmp_path / "two.yaml", train={"nproc_per_node": 2, "master_port": _free_port()})
    one = write_params(tmp_path / "one.yaml", train={"gradient_accumulation_steps": 2})
    run_stage("train", tiny_dataset_dir, tiny_model_dir, tmp_path / "a2", "--params", two, "--metrics", tmp_path / "m2")
    run_stage("train", tiny_dataset_dir, tiny_model_dir, tmp_path / "a1", "--params", one, "--metrics", tmp_path / "m1")

    assert (tmp_path / "a2" / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "m2" / "metrics.json").read_text(encoding="utf-8"))
    assert summary["train"]["global_step"] == 4
    two_losses, one_losses = _loss_rows(tmp_path / "m2"), _loss_rows(tmp_path / "m1")
    assert len(two_losses) == 4
    # Equal up to float summation order: all-reduce and accumulation add the same terms differently.
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    logged = yaml.safe_load((tmp_path / "m2" / "params.yaml").read_text(encoding="utf-8"))
    assert logged["llamafactory"]["lora_rank"] == 4


def test_deepspeed_config_checked(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    import importlib.util

    missing = write_params(tmp_path / "missing.yaml", train={"deepspeed": str(tmp_path / "nowhere.json")})
    process = run_stage("train", tiny_dataset_dir, tiny_model_dir, tmp_path / "a", "--params", missing, check=False)

    assert process.returncode == 1
    assert f"`train.deepspeed` is '{tmp_path / 'nowhere.json'}': file not found" in process.stderr
    assert not (tmp_path / "a").exists()

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here, so the missing-package message cannot be checked")
    config = tmp_path / "ds_z2_config.json"
    config.write_text('{"zero_optimization": {"stage": 2}}', encoding="utf-8")
    present = write_params(tmp_path / "present.yaml", train={"deepspeed": str(config)})
    process = run_stage("train", tiny_dataset_dir, tiny_model_dir, tmp_path / "b", "--params", present, check=False)

    assert process.returncode == 1
    assert "the deepspeed package is not installed" in process.stderr
    assert "Running training" not in process.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_dvc_exp_run_changes_steps(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path) -> None:
    """Run this repository's `train` stage under `dvc repro` and `dvc exp run -S`, in a scratch Git + DVC repo."""
    import os
    import shutil
    import subprocess
    import sys

    from tests.model_fixtures import REPO

    repo = tmp_path / "repo"
    # Copy the whole package: train's deps in dvc.yaml name every module it imports.
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(tiny_dataset_dir, repo / "data" / "dataset")
    shutil.copytree(tiny_model_dir, repo / "models" / "base")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    # check_params depends on the whole params.yaml: an undeclared key reruns nothing else.
    subset = {"check_params": stages["check_params"], "train": stages["train"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": subset}), encoding="utf-8")
    # DVC needs every declared param in the file, so start from the repository's params.yaml.
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    # 8 samples in batches of 2: 4 steps per epoch.
    params["train"].update(epochs=1.0, max_steps=0, per_device_train_batch_size=2, lora_rank=4, seed=7)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}

    def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
        process = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
        if check and process.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {process.returncode}:\n{process.stderr[-3000:]}")
        return process

    run("git", "init", "-q")
    run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "--allow-empty", "-m", "init")
    run("dvc", "init", "-q")
    run("dvc", "repro", "train")
    run("git", "add", "-A")
    run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-q", "-m", "train 1 epoch")
    run("dvc", "exp", "run", "-S", "train.epochs=3")

    shown = json.loads(run("dvc", "exp", "show", "--json").stdout)
    steps = {}
    for commit in shown:
        for experiment in [commit, *(commit.get("experiments") or [])]:
            for revision in experiment.get("revs") or [experiment]:
                data = revision.get("data") or {}
                epochs = data["params"]["params.yaml"]["data"]["train"]["epochs"]
                summary = data["metrics"]["metrics/train/metrics.json"]["data"]
                steps[epochs] = summary["train"]["global_step"]
    assert steps == {1.0: 4, 3.0: 12}

    misspelt = run("dvc", "exp", "run", "-S", "+train.epoch=3", check=False)
    assert misspelt.returncode != 0
    assert "Unknown key `train.epoch`" in misspelt.stdout + misspelt.stderr
    assert "Did you mean `train.epochs`?" in misspelt.stdout + misspelt.stderr
