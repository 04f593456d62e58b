"""LoRA SFT of the base Qwen2-VL on the split dataset with LLaMA-Factory 0.9.5.

Every setting comes from params.yaml: the ``train`` section plus
``convert.cutoff_len``, ``convert.image_max_pixels`` and
``convert.image_min_pixels`` (kept in ``convert`` so that a train change does
not rerun convert). The generated LLaMA-Factory config is written to
``OUT/llamafactory_train.yaml`` before training starts, and that file is what
runs: ``llamafactory-cli train OUT/llamafactory_train.yaml`` repeats the run.

Run (tiny model, CPU, about 20 s)::

    python -m stages.train data/dataset models/base models/adapter

- One process (``train.nproc_per_node: 1``, ``train.nnodes: 1``, no DeepSpeed):
  ``llamafactory.train.tuner.run_exp`` in this process, with transformers'
  ``DVCLiveCallback`` logging every step to ``--metrics`` (default
  ``metrics/train``).
- Otherwise ``llamafactory-cli train`` with ``FORCE_TORCHRUN=1`` and
  ``NNODES``/``NODE_RANK``/``NPROC_PER_NODE``/``MASTER_ADDR``/``MASTER_PORT``
  from params; ``torchrun`` must be on PATH. The CLI cannot take callbacks, so
  afterwards the ``trainer_state.json`` log history is replayed through the
  same ``DVCLiveCallback``.

Before training, the stage rejects a ``train.template`` that LLaMA-Factory
does not register, ``train.precision`` bf16 or fp16 without a CUDA device,
and a ``convert.cutoff_len`` that is too small for the dataset. LLaMA-Factory truncates a longer sample, which can cut
through its image tokens, and Qwen2-VL then fails at the first step with
"Image features and image tokens do not match".

Covered by tests on CPU: one process, two gloo processes, the cutoff check,
bit-identical adapters for one seed. Not run here: GPUs, bf16/fp16,
DeepSpeed and multiple nodes.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.common import StageError, drop_wall_clock, get_logger
from stages.config import ConvertParams, Params, ParamsError, TrainParams, load_params
from stages.templates import check_template

log = get_logger(__name__)

CONFIG_NAME = "llamafactory_train.yaml"
TRAIN_DATASET = "silu_train"
# Qwen2-VL: 14 px patches merged 2x2, so one image token covers 28 x 28 pixels.
PATCH_FACTOR = 28
# Image processor limits of the released Qwen2-VL when the checkpoint does not state them.
DEFAULT_PROCESSOR_MIN_PIXELS = 56 * 56
DEFAULT_PROCESSOR_MAX_PIXELS = 28 * 28 * 1280


# --------------------------------------------------------------------------- token budget


def image_token_count(
    width: int, height: int, image_max_pixels: int, image_min_pixels: int, processor_min: int, processor_max: int
) -> int:
    """Return the ``<|image_pad|>`` tokens LLaMA-Factory 0.9.5 produces for one image of this size.

    Follows ``BasePlugin._preprocess_image`` and ``Qwen2VLPlugin._preprocess_image``
    (resize into the pixel range, at least 28 px a side, aspect ratio capped
    at 200 by squashing to 180:1), then Qwen2-VL's ``smart_resize``.
    """
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    if width * height > image_max_pixels:
        factor = math.sqrt(image_max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if width * height < image_min_pixels:
        factor = math.sqrt(image_min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min(width, height) < PATCH_FACTOR:
        width, height = max(width, PATCH_FACTOR), max(height, PATCH_FACTOR)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    resized_height, resized_width = smart_resize(
        height, width, factor=PATCH_FACTOR, min_pixels=processor_min, max_pixels=processor_max
    )
    return (resized_height // PATCH_FACTOR) * (resized_width // PATCH_FACTOR)


def processor_pixel_limits(base_dir: Path) -> tuple[int, int]:
    """Read the image processor's min/max pixels from a checkpoint (transformers 4.x or 5.x layout)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = base_dir / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        config = config.get("image_processor", config)
        size = config.get("size") or {}
        minimum = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
        maximum = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
        if minimum and maximum:
            return int(minimum), int(maximum)
    log.warning(
        "%s: no image processor pixel limits found; assuming Qwen2-VL's %d..%d",
        base_dir,
        DEFAULT_PROCESSOR_MIN_PIXELS,
        DEFAULT_PROCESSOR_MAX_PIXELS,
    )
    return DEFAULT_PROCESSOR_MIN_PIXELS, DEFAULT_PROCESSOR_MAX_PIXELS


@dataclass(frozen=True)
class DatasetSummary:
    """Sample count and token maxima of the train split, as the cutoff check reads them."""

    samples: int
    shards: list[str]
    max_tokens: int | None
    max_tokens_img_id: str | None
    over_cutoff: int
    max_image_tokens: int
    max_image_tokens_img_id: str | None


def train_shards(dataset_dir: Path) -> list[Path]:
    """Return the train split's parquet files, after checking ``dataset_info.json`` declares ``silu_train``."""
    info_path = dataset_dir / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{info_path} not found; run the split stage first (dvc repro split).") from None
    if TRAIN_DATASET not in info:
        raise StageError(f"{info_path} has no `{TRAIN_DATASET}` entry (found {sorted(info)}); rerun the split stage.")
    source = dataset_dir / info[TRAIN_DATASET]["file_name"]
    shards = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not shards or not shards[0].is_file():
        raise StageError(f"{source}: no parquet files for `{TRAIN_DATASET}`; rerun the split stage.")
    return shards


def summarise_dataset(dataset_dir: Path, base_dir: Path, convert: ConvertParams) -> DatasetSummary:
    """Read the train split's ``tokens`` column and image sizes, and count each image's tokens."""
    import pyarrow.parquet as pq
    from PIL import Image

    processor_min, processor_max = processor_pixel_limits(base_dir)
    shards = train_shards(dataset_dir)
    samples = over_cutoff = max_image_tokens = 0
    max_tokens = max_tokens_id = max_image_id = None
    for shard in shards:
        names = pq.read_schema(shard).names
        columns = [c for c in ("img_id", "tokens", "images") if c in names]
        table = pq.read_table(shard, columns=columns).to_pylist()
        if "tokens" not in names:
            log.warning("%s has no `tokens` column; checking image tokens only", shard)
        for row in table:
            samples += 1
            tokens = row.get("tokens")
            if tokens is not None:
                if tokens > convert.cutoff_len:
                    over_cutoff += 1
                if max_tokens is None or tokens > max_tokens:
                    max_tokens, max_tokens_id = tokens, row.get("img_id")
            image_tokens = 0
            for image in row.get("images") or []:
                with Image.open(io.BytesIO(image["bytes"])) as opened:
                    width, height = opened.size
                image_tokens += image_token_count(
                    width, height, convert.image_max_pixels, convert.image_min_pixels, processor_min, processor_max
                )
            if image_tokens > max_image_tokens:
                max_image_tokens, max_image_id = image_tokens, row.get("img_id")
    return DatasetSummary(
        samples=samples,
        shards=[str(s) for s in shards],
        max_tokens=max_tokens,
        max_tokens_img_id=max_tokens_id,
        over_cutoff=over_cutoff,
        max_image_tokens=max_image_tokens,
        max_image_tokens_img_id=max_image_id,
    )


def check_cutoff(summary: DatasetSummary, convert: ConvertParams) -> None:
    """Raise :class:`StageError` when ``convert.cutoff_len`` would truncate a sample's image tokens."""
    if summary.samples == 0:
        raise StageError(f"`{TRAIN_DATASET}` has no samples ({', '.join(summary.shards)}); nothing to train on.")
    # Each image adds <|vision_start|> and <|vision_end|> around its pad tokens.
    image_need = summary.max_image_tokens + 2
    if convert.cutoff_len < image_need:
        raise StageError(
            f"`convert.cutoff_len` is {convert.cutoff_len}, below the {image_need} tokens that the image of sample "
            f"{summary.max_image_tokens_img_id} alone needs at `convert.image_max_pixels` = "
            f"{convert.image_max_pixels}. Raise `convert.cutoff_len` above {image_need} (plus the text) or lower "
            "`convert.image_max_pixels`, then rerun convert (dvc repro)."
        )
    if summary.over_cutoff:
        raise StageError(
            f"`convert.cutoff_len` is {convert.cutoff_len}, but {summary.over_cutoff} of {summary.samples} train "
            f"samples are longer (max {summary.max_tokens} tokens, img_id {summary.max_tokens_img_id}); LLaMA-Factory "
            "would cut through their image tokens and fail at the first step. Rerun convert with this cutoff "
            f"(dvc repro) or raise `convert.cutoff_len` to at least {summary.max_tokens}."
        )


# --------------------------------------------------------------------------- LLaMA-Factory config


def is_distributed(train: TrainParams) -> bool:
    """Return whether the run goes through torchrun (several processes, nodes or DeepSpeed)."""
    return train.nproc_per_node > 1 or train.nnodes > 1 or bool(train.deepspeed)


def build_config(params: Params, dataset_dir: Path, base_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Return the LLaMA-Factory SFT arguments for ``params``; keys are LLaMA-Factory's own."""
    train, convert = params.train, params.convert
    config: dict[str, Any] = {
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "model_name_or_path": str(base_dir),
        "trust_remote_code": False,
        "template": train.template,
        "dataset_dir": str(dataset_dir),
        # Images are stored as bytes in the parquet files; a relative path would resolve here.
        "media_dir": str(dataset_dir),
        # NOTE: LLaMA-Factory 0.9.5 concatenates the split's parquet files in os.listdir order, so with
        # several shards the sample order, and with it the trained weights, can differ on another filesystem.
        "dataset": TRAIN_DATASET,
        "cutoff_len": convert.cutoff_len,
        "image_max_pixels": convert.image_max_pixels,
        "image_min_pixels": convert.image_min_pixels,
        "preprocessing_num_workers": train.preprocessing_num_workers,
        # The datasets cache is keyed by fingerprints, not by the image pixel limits; rebuild it every run.
        "overwrite_cache": True,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "num_train_epochs": train.epochs,
        "learning_rate": train.learning_rate,
        "lr_scheduler_type": train.lr_scheduler_type,
        "warmup_ratio": train.warmup_ratio,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "lora_rank": train.lora_rank,
        "lora_alpha": train.lora_alpha,
        "lora_dropout": train.lora_dropout,
        "lora_target": train.lora_target,
        "freeze_vision_tower": train.freeze_vision_tower,
        "freeze_multi_modal_projector": train.freeze_multi_modal_projector,
        "seed": train.seed,
        "data_seed": train.seed,
        "logging_steps": train.logging_steps,
        # Only the final adapter is kept: intermediate checkpoints would be untracked DVC output.
        "save_strategy": "no",
        "plot_loss": False,
        # DVCLive is attached by this stage (see module docstring), not through report_to.
        "report_to": "none",
    }
    if train.max_steps:
        config["max_steps"] = train.max_steps
    if train.precision == "bf16":
        config["bf16"] = True
    elif train.precision == "fp16":
        config["fp16"] = True
    if train.deepspeed:
        config["deepspeed"] = train.deepspeed
    if is_distributed(train):
        # Generous NCCL/gloo timeout (seconds): preprocessing on rank 0 can take long on 30,000 images.
        config["ddp_timeout"] = 180000000
    return config


def write_config(config: dict[str, Any], path: Path) -> None:
    header = (
        "# LLaMA-Factory 0.9.5 SFT config generated by `python -m stages.train` from params.yaml.\n"
        "# Rerun by hand: llamafactory-cli train " + str(path) + "\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def llamafactory_params(config: dict[str, Any], summary: DatasetSummary) -> dict[str, Any]:
    """Return the LLaMA-Factory settings and dataset facts logged beside the trainer's own arguments."""
    return {
        "llamafactory": {key: value for key, value in config.items() if key not in ("output_dir", "report_to")},
        "dataset": {
            "train_samples": summary.samples,
            "max_tokens": summary.max_tokens,
            "max_image_tokens": summary.max_image_tokens,
        },
    }


# --------------------------------------------------------------------------- DVCLive


def open_live(metrics_dir: Path):
    """Open a DVCLive logger for use inside a DVC stage: no experiment of its own, no dvc.yaml edits."""
    from dvclive import Live

    class PipelineLive(Live):
        """``Live`` that skips building Studio updates when no Studio is configured."""

        def post_data_to_studio(self):
            # dvclive 3.49.1 re-reads every plot TSV on each step to build the Studio update, even
            # when Studio is off and the update is dropped, so a run's cost grows with steps squared.
            if "data" in self._studio_events_to_skip:
                return
            super().post_data_to_studio()

    # dvcyaml=None: the metrics and plots are declared in the pipeline's dvc.yaml.
    # save_dvc_exp=False: `dvc exp run` records the experiment; under `dvc repro` there is none.
    return PipelineLive(dir=str(metrics_dir), save_dvc_exp=False, dvcyaml=None)


def _global_step_callback(live):
    from transformers import TrainerCallback

    class GlobalStepCallback(TrainerCallback):
        """Put the optimizer step count into the DVCLive summary, before DVCLiveCallback ends the run."""

        def on_train_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                live.log_metric("train/global_step", state.global_step, plot=False)

    return GlobalStepCallback()


def replay_to_dvclive(live, out_dir: Path) -> None:
    """Feed a finished run's ``trainer_state.json`` through ``DVCLiveCallback``, as the in-process run does."""
    import torch
    from transformers import TrainerControl, TrainerState
    from transformers.integrations import DVCLiveCallback

    state_path = out_dir / "trainer_state.json"
    if not state_path.is_file():
        raise StageError(f"{state_path} not found after training; LLaMA-Factory did not finish the run.")
    state = TrainerState.load_from_json(str(state_path))
    state.is_world_process_zero = True
    # training_args.bin is the TrainingArguments object the trainer pickled a moment ago in this run.
    args = torch.load(out_dir / "training_args.bin", weights_only=False)
    control = TrainerControl()
    step_callback = _global_step_callback(live)
    callback = DVCLiveCallback(live=live)
    callback.setup(args, state, None)
    for entry in state.log_history:
        logs = {key: value for key, value in entry.items() if key != "step"}
        callback.on_log(args, state, control, logs=logs)
    step_callback.on_train_end(args, state, control)
    callback.on_train_end(args, state, control)


# --------------------------------------------------------------------------- running


def run_in_process(config: dict[str, Any], live) -> None:
    from llamafactory.train.tuner import run_exp
    from transformers.integrations import DVCLiveCallback

    # Order matters: the step callback must log before DVCLiveCallback.on_train_end calls live.end().
    callbacks = [_global_step_callback(live), DVCLiveCallback(live=live)]
    try:
        run_exp(dict(config), callbacks=callbacks)
    except ValueError as exc:
        raise StageError(f"LLaMA-Factory failed on {config['output_dir']}/{CONFIG_NAME}: {exc}") from exc


def check_precision(train: TrainParams) -> None:
    """Raise :class:`StageError` when ``train.precision`` is bf16 or fp16 and no CUDA device is available.

    On the CPU, LLaMA-Factory 0.9.5 rejects bf16 with a message about ``use_cpu``,
    which is not a pipeline param, and trains fp16 without a warning.
    """
    if train.precision == "fp32":
        return
    import torch

    # NOTE: only CUDA is detected, so bf16/fp16 on an Ascend NPU or Apple MPS machine is rejected too.
    if not torch.cuda.is_available():
        raise StageError(
            f"`train.precision` is {train.precision!r}, but no CUDA device is available "
            "(torch.cuda.is_available() is False). Set `train.precision: fp32` to train on the CPU."
        )


def _find_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def check_launcher(train: TrainParams) -> tuple[str, str]:
    """Return the paths of ``llamafactory-cli`` and ``torchrun``; check the DeepSpeed config and package."""
    cli = _find_tool("llamafactory-cli")
    torchrun = _find_tool("torchrun")
    if cli is None or torchrun is None:
        missing = "llamafactory-cli" if cli is None else "torchrun"
        raise StageError(f"{missing} not found beside {sys.executable} or on PATH; run `make install` first.")
    if train.deepspeed:
        import importlib.util

        if not Path(train.deepspeed).is_file():
            raise StageError(f"`train.deepspeed` is {train.deepspeed!r}: file not found; give a DeepSpeed JSON.")
        if importlib.util.find_spec("deepspeed") is None:
            raise StageError(
                f"`train.deepspeed` is {train.deepspeed!r} but the deepspeed package is not installed; "
                "install it on the GPU server (see docs/model.md) or set `train.deepspeed: \"\"`."
            )
    return cli, torchrun


def run_torchrun(config_path: Path, train: TrainParams) -> None:
    """Run ``llamafactory-cli train CONFIG`` under torchrun with the distributed settings from params."""
    cli, torchrun = check_launcher(train)
    env = dict(os.environ)
    # LLaMA-Factory's launcher starts `torchrun` by name, so its folder must be on PATH.
    env["PATH"] = os.pathsep.join([str(Path(torchrun).parent), env.get("PATH", "")])
    env.update(
        FORCE_TORCHRUN="1",
        NNODES=str(train.nnodes),
        NODE_RANK=str(train.node_rank),
        NPROC_PER_NODE=str(train.nproc_per_node),
        MASTER_ADDR=train.master_addr,
        MASTER_PORT=str(train.master_port),
    )
    command = [cli, "train", str(config_path)]
    log.info(
        "launching %s on %d node(s) x %d process(es), node rank %d, master %s:%d",
        " ".join(command),
        train.nnodes,
        train.nproc_per_node,
        train.node_rank,
        train.master_addr,
        train.master_port,
    )
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise StageError(
            f"llamafactory-cli train {config_path} exited {result.returncode}; its log is above. "
            "Rerun that command with the same FORCE_TORCHRUN/NNODES/NPROC_PER_NODE variables to debug."
        )


def _normalise_adapter_config(out_dir: Path) -> None:
    """Sort ``target_modules`` in adapter_config.json: PEFT stores a set, so its order changes between runs."""
    path = out_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def train(
    params: Params, dataset_dir: str | Path, base_dir: str | Path, out_dir: str | Path, metrics_dir: str | Path
) -> Path:
    """Check the dataset against the cutoff, write the LLaMA-Factory config, train, and log to DVCLive."""
    dataset_dir, base_dir, out_dir, metrics_dir = map(Path, (dataset_dir, base_dir, out_dir, metrics_dir))
    if not (base_dir / "config.json").is_file():
        raise StageError(f"{base_dir}/config.json not found; run the base stage first (dvc repro base).")
    check_template(params.train.template)
    check_precision(params.train)
    if is_distributed(params.train):
        check_launcher(params.train)
    summary = summarise_dataset(dataset_dir, base_dir, params.convert)
    log.info(
        "%d train samples; longest %s tokens, largest image %d tokens; cutoff_len %d",
        summary.samples,
        summary.max_tokens,
        summary.max_image_tokens,
        params.convert.cutoff_len,
    )
    check_cutoff(summary, params.convert)

    config = build_config(params, dataset_dir, base_dir, out_dir)
    # DVC deletes the output before the stage runs. A failed run removes what it wrote
    # below, so merge never picks up a half-trained adapter.
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    config_path = out_dir / CONFIG_NAME
    write_config(config, config_path)
    primary = params.train.node_rank == 0
    try:
        live = open_live(metrics_dir) if primary else None
        if live is not None:
            live.log_params(llamafactory_params(config, summary))
        if is_distributed(params.train):
            run_torchrun(config_path, params.train)
            if live is not None:
                replay_to_dvclive(live, out_dir)
        else:
            run_in_process(config, live)
        if primary:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                if not (out_dir / name).is_file():
                    raise StageError(f"{out_dir}/{name} not found after training; see the LLaMA-Factory log above.")
            _normalise_adapter_config(out_dir)
            drop_wall_clock(out_dir)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    log.info("adapter written to %s, metrics to %s", out_dir, metrics_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="split dataset folder (dataset_info.json with silu_train)")
    parser.add_argument("base", help="base model folder written by the base stage")
    parser.add_argument("out", help="adapter output folder")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--metrics", default="metrics/train", help="DVCLive folder (default: metrics/train)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        train(params, args.dataset, args.base, args.out, args.metrics)
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
