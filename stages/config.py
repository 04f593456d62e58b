"""Load and validate ``params.yaml`` into typed, frozen objects.

Every stage calls :func:`load_params` first, so a bad file fails before any
work starts. The whole file is checked, not only the calling stage's section:
``dvc exp run -S train.epoch=3`` silently adds the misspelt key to the file,
and the next stage that runs must reject it.

Run ``python -m stages.config [params.yaml]`` to check a file by hand; the
``check_params`` stage in ``dvc.yaml`` runs the same check on every change.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ParamsError(ValueError):
    """Invalid ``params.yaml``: the message names the key, the value and the fix."""


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    """Declare a field with its default and the help text that ``--describe`` prints."""
    return field(default=default, metadata={"help": text})


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DataParams:
    lang: str = _help("SiLu language code of the captions to keep (ko, ru, vi, ar, hu, cs, th, sr).", "ko")
    source: str = _help("Path of the SiLu image-caption JSONL or .jsonl.gz (DVC-tracked).", "data/sample/ko_sample.jsonl")
    image_root: str = _help(
        "Folder that relative `image.path` values resolve against. It is also a DVC dep, so keep it an existing "
        "folder (such as the source file's folder) even when every path is a URL.",
        "data/sample/images",
    )
    limit: int = _help("Read only the first N lines of the source (0 = all).", 0)

    def __post_init__(self) -> None:
        if self.lang not in LANGUAGES:
            raise ParamsError(
                f"`data.lang` is {self.lang!r}; expected one of {sorted(LANGUAGES)}. "
                "Prompts exist only for these SiLu languages."
            )
        _check_min("data.limit", self.limit, 0)
        if not self.source:
            raise ParamsError("`data.source` is empty; set it to the path of a SiLu JSONL file.")
        if not self.image_root:
            raise ParamsError(
                "`data.image_root` is empty; dvc.yaml lists it as a dep, so set it to an existing folder "
                "(the source file's folder when every image.path is a URL)."
            )


@dataclass(frozen=True)
class DownloadParams:
    workers: int = _help("Concurrent HTTP fetches.", 32)
    connect_timeout: float = _help("TCP connect timeout per request, seconds.", 5.0)
    read_timeout: float = _help("Timeout between two received bytes, seconds.", 10.0)
    deadline: float = _help("Total time allowed per image, retries and redirects included, seconds.", 30.0)
    max_bytes: int = _help("Largest accepted response body, bytes.", 20_000_000)
    max_redirects: int = _help("Redirects followed per request.", 5)
    retries: int = _help("Retries after a transient failure (connection error, 429, 5xx).", 2)
    backoff: float = _help("First retry delay, seconds; doubles on each retry.", 0.5)
    shard_size: int = _help("Records per output shard (one tar + one manifest per shard).", 2000)
    max_error_rate: float = _help(
        "Fail the stage when the fraction of dropped records exceeds this (1.0 = never fail).", 1.0
    )
    user_agent: str = _help("User-Agent header sent with every request.", "silu-pipeline/0.1 (+dataset download)")
    allow_private_hosts: bool = _help(
        "Fetch from loopback, private, link-local, multicast and reserved addresses too (true only for local test "
        "servers). When false, such URLs and redirects are dropped as `blocked address`.",
        False,
    )

    def __post_init__(self) -> None:
        _check_min("download.workers", self.workers, 1)
        _check_positive("download.connect_timeout", self.connect_timeout)
        _check_positive("download.read_timeout", self.read_timeout)
        _check_positive("download.deadline", self.deadline)
        _check_min("download.max_bytes", self.max_bytes, 1)
        _check_min("download.max_redirects", self.max_redirects, 0)
        _check_min("download.retries", self.retries, 0)
        _check_min("download.backoff", self.backoff, 0)
        _check_min("download.shard_size", self.shard_size, 1)
        _check_fraction("download.max_error_rate", self.max_error_rate)
        if self.deadline < self.connect_timeout:
            raise ParamsError(
                f"`download.deadline` ({self.deadline}) is shorter than `download.connect_timeout` "
                f"({self.connect_timeout}); raise the deadline or lower the timeout."
            )


@dataclass(frozen=True)
class FilterParams:
    min_side: int = _help("Smallest accepted width or height, pixels (Qwen2-VL patches are 28 px).", 28)
    max_aspect: float = _help("Largest accepted long side / short side.", 20.0)
    max_pixels: int = _help("Largest accepted width x height, pixels; larger files are dropped unread.", 40_000_000)
    background: str = _help("Colour that transparent pixels are composited on, as #rrggbb.", "#ffffff")
    jpeg_quality: int = _help("JPEG quality of re-encoded images (1-95).", 95)
    workers: int = _help("Decoding processes (0 = one per CPU core).", 0)
    max_error_rate: float = _help(
        "Fail the stage when the fraction of dropped images exceeds this (1.0 = never fail).", 1.0
    )

    def __post_init__(self) -> None:
        _check_min("filter.min_side", self.min_side, 1)
        if self.max_aspect < 1:
            raise ParamsError(f"`filter.max_aspect` is {self.max_aspect}; it must be >= 1 (long side / short side).")
        if self.max_aspect >= 200:
            raise ParamsError(
                f"`filter.max_aspect` is {self.max_aspect}; Qwen2-VL rejects aspect ratios of 200 or more, "
                "so use a value below 200."
            )
        _check_min("filter.max_pixels", self.max_pixels, self.min_side * self.min_side)
        # int(x, 16) alone would accept a sign, spaces and underscores.
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", self.background):
            raise ParamsError(f"`filter.background` is {self.background!r}; write a colour as #rrggbb.")
        if not 1 <= self.jpeg_quality <= 95:
            raise ParamsError(f"`filter.jpeg_quality` is {self.jpeg_quality}; use 1-95.")
        _check_min("filter.workers", self.workers, 0)
        _check_fraction("filter.max_error_rate", self.max_error_rate)


@dataclass(frozen=True)
class ConvertParams:
    cutoff_len: int = _help(
        "Maximum tokens per sample, text plus image tokens; longer samples are dropped, never truncated.", 2048
    )
    image_max_pixels: int = _help("Images above this many pixels are downscaled before tokenising.", 589_824)
    image_min_pixels: int = _help("Images below this many pixels are upscaled before tokenising.", 1024)
    prompt_seed: int = _help("Seed that picks one prompt phrasing per record.", 0)
    shard_size: int = _help("Samples per parquet shard.", 2000)

    def __post_init__(self) -> None:
        _check_min("convert.cutoff_len", self.cutoff_len, 16)
        _check_min("convert.image_min_pixels", self.image_min_pixels, 28 * 28)
        if self.image_max_pixels < self.image_min_pixels:
            raise ParamsError(
                f"`convert.image_max_pixels` ({self.image_max_pixels}) is below `convert.image_min_pixels` "
                f"({self.image_min_pixels}); raise the maximum."
            )
        _check_min("convert.shard_size", self.shard_size, 1)


@dataclass(frozen=True)
class SplitParams:
    test_size: float = _help("Test samples: a count (>= 1) or a fraction of the kept samples (0 < x < 1).", 0.2)
    train_size: float = _help("Train samples: a count, a fraction, or 0 for all that remain after the test set.", 0)
    seed: int = _help("Shuffle seed.", 42)

    def __post_init__(self) -> None:
        for key, value in (("split.test_size", self.test_size), ("split.train_size", self.train_size)):
            if value < 0 or (value >= 1 and value != int(value)):
                raise ParamsError(
                    f"`{key}` is {value}; use a whole count (>= 1), a fraction between 0 and 1, or 0."
                )
        if self.test_size == 0:
            raise ParamsError("`split.test_size` is 0; evaluate needs at least one test sample.")
        if 0 < self.test_size < 1 and 0 < self.train_size < 1 and self.test_size + self.train_size > 1:
            raise ParamsError(
                f"`split.test_size` + `split.train_size` = {self.test_size + self.train_size} > 1; lower one of them."
            )


@dataclass(frozen=True)
class BaseParams:
    source: Literal["tiny", "modelscope", "huggingface", "local"] = _help(
        "Where the base model comes from: a tiny random Qwen2-VL built offline, a hub, or a local folder.", "tiny"
    )
    model_id: str = _help("Hub id for modelscope/huggingface, e.g. Qwen/Qwen2-VL-2B-Instruct.", "Qwen/Qwen2-VL-2B-Instruct")
    revision: str = _help("Hub revision (commit hash or tag) to pin; required for hub sources.", "")
    local_path: str = _help("Folder with a Qwen2-VL checkpoint, for source: local.", "")
    tiny_seed: int = _help("Seed of the tiny random model's weights.", 0)

    def __post_init__(self) -> None:
        if self.source in ("modelscope", "huggingface") and not self.revision:
            raise ParamsError(
                f"`base.revision` is empty for source {self.source}; pin a commit hash or tag so the "
                "weights are reproducible."
            )
        if self.source == "local" and not self.local_path:
            raise ParamsError("`base.local_path` is empty for source local; set it to a model folder.")


@dataclass(frozen=True)
class TrainParams:
    template: str = _help("LLaMA-Factory chat template.", "qwen2_vl")
    epochs: float = _help("Training epochs (num_train_epochs).", 2.0)
    max_steps: int = _help("Stop after this many optimizer steps (0 = run all epochs).", 0)
    learning_rate: float = _help("Peak learning rate.", 1.0e-4)
    lr_scheduler_type: Literal[
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ] = _help("transformers learning-rate scheduler (SchedulerType) name.", "cosine")
    warmup_ratio: float = _help("Fraction of steps spent warming up.", 0.1)
    per_device_train_batch_size: int = _help("Samples per device per step.", 2)
    gradient_accumulation_steps: int = _help("Steps accumulated per optimizer update.", 1)
    lora_rank: int = _help("LoRA rank.", 8)
    lora_alpha: int = _help("LoRA alpha (scaling = alpha / rank).", 16)
    lora_dropout: float = _help("LoRA dropout.", 0.0)
    lora_target: str = _help("Comma-separated module names or `all`.", "all")
    freeze_vision_tower: bool = _help("Keep the vision encoder frozen.", True)
    freeze_multi_modal_projector: bool = _help("Keep the vision-to-text projector frozen.", True)
    precision: Literal["fp32", "bf16", "fp16"] = _help("Training precision; fp32 on CPU.", "fp32")
    seed: int = _help("Training seed.", 42)
    logging_steps: int = _help("Log loss every N steps.", 1)
    preprocessing_num_workers: int = _help("Processes that tokenise the dataset.", 1)
    nproc_per_node: int = _help("Training processes per node (GPUs per node); >1 launches torchrun.", 1)
    nnodes: int = _help("Nodes in a multi-node run.", 1)
    node_rank: int = _help("This node's rank in a multi-node run.", 0)
    master_addr: str = _help("Rank-0 node address for multi-node runs.", "127.0.0.1")
    master_port: int = _help("Rank-0 node port for multi-node runs.", 29500)
    deepspeed: str = _help("DeepSpeed config JSON path (ZeRO-2/3), or empty for none.", "")

    def __post_init__(self) -> None:
        _check_positive("train.epochs", self.epochs)
        _check_min("train.max_steps", self.max_steps, 0)
        _check_positive("train.learning_rate", self.learning_rate)
        _check_fraction("train.warmup_ratio", self.warmup_ratio)
        _check_min("train.per_device_train_batch_size", self.per_device_train_batch_size, 1)
        _check_min("train.gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_min("train.lora_rank", self.lora_rank, 1)
        _check_min("train.lora_alpha", self.lora_alpha, 1)
        _check_fraction("train.lora_dropout", self.lora_dropout)
        _check_min("train.logging_steps", self.logging_steps, 1)
        _check_min("train.preprocessing_num_workers", self.preprocessing_num_workers, 1)
        _check_min("train.nproc_per_node", self.nproc_per_node, 1)
        _check_min("train.nnodes", self.nnodes, 1)
        if not 0 <= self.node_rank < self.nnodes:
            raise ParamsError(f"`train.node_rank` is {self.node_rank}; it must be in [0, train.nnodes={self.nnodes}).")
        if not self.lora_target:
            raise ParamsError("`train.lora_target` is empty; use `all` or comma-separated module names.")
        if not 1 <= self.master_port <= 65535:
            raise ParamsError(f"`train.master_port` is {self.master_port}; use 1-65535.")
        if not self.master_addr:
            raise ParamsError("`train.master_addr` is empty; set the rank-0 node address (127.0.0.1 for one node).")
        if not self.template:
            raise ParamsError("`train.template` is empty; use qwen2_vl for Qwen2-VL models.")


@dataclass(frozen=True)
class MergeParams:
    export_size: int = _help("Largest safetensors shard of the merged model, GB.", 5)

    def __post_init__(self) -> None:
        _check_min("merge.export_size", self.export_size, 1)


@dataclass(frozen=True)
class EvaluateParams:
    max_samples: int = _help("Score at most N test samples (0 = all).", 0)
    max_new_tokens: int = _help("Tokens generated per answer.", 64)
    batch_size: int = _help("Samples per generation batch.", 4)
    score_base: bool = _help("Also generate with the base model, so the metrics show the gain.", True)

    def __post_init__(self) -> None:
        _check_min("evaluate.max_samples", self.max_samples, 0)
        _check_min("evaluate.max_new_tokens", self.max_new_tokens, 1)
        _check_min("evaluate.batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class DeployParams:
    host: str = _help("Board address (the stand-in listens on 127.0.0.1).", "127.0.0.1")
    port: int = _help("Board SSH port.", 2222)
    user: str = _help("Board login user (HwHiAiUser on a real OrangePi AIpro).", "")
    key_file: str = _help("Private key file; empty to use the SSH agent. Never a password.", ".board/client_key")
    known_hosts: str = _help("known_hosts file the board's host key is checked against.", ".board/known_hosts")
    trust_new_host: bool = _help("Add an unknown board host key to known_hosts instead of rejecting it.", False)
    remote_dir: str = _help("Release root on the board; releases go under it and `current` links one.", "")
    python: str = _help("Python 3.9 on the board with MindSpore + MindNLP installed.", "")
    device: Literal["CPU", "Ascend"] = _help("MindSpore device target on the board.", "CPU")
    ascend_workarounds: bool = _help("Apply the 310B inference workarounds (unverified on real hardware).", False)
    samples: int = _help("Test images answered on the board.", 4)
    max_new_tokens: int = _help("Tokens generated per board answer.", 16)
    keep_releases: int = _help("Old releases kept on the board besides `current`.", 1)
    connect_timeout: float = _help(
        "SSH connect timeout, also for opening a channel and starting a remote command, seconds.", 10.0
    )
    transfer_timeout: float = _help(
        "Idle timeout for one SFTP request, and the base time of each board-side release step "
        "(plus 1 s per 20 MB it hashes), seconds.",
        60.0,
    )
    run_timeout: float = _help("Whole remote inference run, seconds; the remote process group is killed after it.", 600.0)

    def __post_init__(self) -> None:
        if not self.host:
            raise ParamsError("`deploy.host` is empty; set the board address (127.0.0.1 for the stand-in).")
        # Remote paths travel shell-quoted, so the board's shell never expands `~` in them.
        for key, value in (("deploy.remote_dir", self.remote_dir), ("deploy.python", self.python)):
            if value.startswith("~"):
                raise ParamsError(
                    f"`{key}` is {value!r}; the board does not expand `~` in quoted paths, so write the "
                    "absolute path (for example /home/HwHiAiUser/...)."
                )
        if self.remote_dir and not self.remote_dir.startswith("/"):
            raise ParamsError(
                f"`deploy.remote_dir` is {self.remote_dir!r}; write an absolute path on the board, "
                "such as /home/HwHiAiUser/silu."
            )
        if not 1 <= self.port <= 65535:
            raise ParamsError(f"`deploy.port` is {self.port}; use 1-65535.")
        _check_min("deploy.samples", self.samples, 1)
        _check_min("deploy.max_new_tokens", self.max_new_tokens, 1)
        _check_min("deploy.keep_releases", self.keep_releases, 0)
        _check_positive("deploy.connect_timeout", self.connect_timeout)
        _check_positive("deploy.transfer_timeout", self.transfer_timeout)
        _check_positive("deploy.run_timeout", self.run_timeout)
        if self.ascend_workarounds and self.device != "Ascend":
            raise ParamsError("`deploy.ascend_workarounds` is true but `deploy.device` is CPU; set device: Ascend.")


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    download: DownloadParams = field(default_factory=DownloadParams)
    filter: FilterParams = field(default_factory=FilterParams)
    convert: ConvertParams = field(default_factory=ConvertParams)
    split: SplitParams = field(default_factory=SplitParams)
    base: BaseParams = field(default_factory=BaseParams)
    train: TrainParams = field(default_factory=TrainParams)
    merge: MergeParams = field(default_factory=MergeParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    deploy: DeployParams = field(default_factory=DeployParams)


LANGUAGES = {"ko", "ru", "vi", "ar", "hu", "cs", "th", "sr"}


# --------------------------------------------------------------------------- checks


def _check_min(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ParamsError(f"`{key}` is {value}; it must be >= {minimum}.")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ParamsError(f"`{key}` is {value}; it must be > 0.")


def _check_fraction(key: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise ParamsError(f"`{key}` is {value}; it must be between 0 and 1.")


_YAML12_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; return it with ints widened to floats."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ParamsError(f"`{key}` is {value!r}; expected one of {list(choices)}.")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if annotation is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"`{key}` is {value!r}; expected true or false.")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"`{key}` is {value!r}; expected a whole number.")
        return value
    if annotation is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            # PyYAML follows YAML 1.1, where a float needs a dot, so it reads `5e-05` (which
            # `dvc exp run -S train.learning_rate=5e-5` writes) as a string. YAML 1.2 and DVC read a float.
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"`{key}` is {value!r}; expected a number.")
        # YAML reads .nan and .inf as floats, and every range check below passes NaN.
        if not math.isfinite(value):
            raise ParamsError(f"`{key}` is {value!r}; expected a finite number.")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ParamsError(f"`{key}` is {value!r}; expected a string (quote it in YAML).")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"`{prefix}` is {raw!r}; expected a mapping of keys.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean `{prefix}.{close[0]}`?" if close else f" Known keys: {', '.join(names)}."
        raise ParamsError(f"Unknown key `{prefix}.{key}`.{hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(f"{prefix}.{name}", raw[name], hints[name])
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a parsed ``params.yaml`` mapping and return typed sections."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml must contain a mapping of sections (data, download, ...).")
    hints = typing.get_type_hints(Params)
    sections = {}
    names = [f.name for f in dataclasses.fields(Params)]
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else f" Known sections: {', '.join(names)}."
            raise ParamsError(f"Unknown section `{key}`.{hint}")
        sections[key] = _build(hints[key], value, key)
    return Params(**sections)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``path``; raise :class:`ParamsError` naming the file on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found; run from the repository root or pass its path.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: invalid YAML: {exc}") from None
    try:
        return parse_params(raw)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def describe() -> str:
    """Return every key with its default and help text, for the README and ``--help``."""
    lines = []
    for section in dataclasses.fields(Params):
        cls = typing.get_type_hints(Params)[section.name]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else ""
            lines.append(f"{section.name}.{f.name}\t{default!r}\t{f.metadata.get('help', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m stages.config [params.yaml] [--describe]")
        return 0
    if "--describe" in argv:
        print(describe())
        return 0
    path = argv[0] if argv else "params.yaml"
    try:
        load_params(path)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{path}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
