"""Session fixtures for the model stages: a tiny SiLu dataset, a trained adapter, a merged model.

The dataset has the layout the split stage writes (``train/`` and ``test/``
parquet shards plus ``dataset_info.json`` with ``silu_train``/``silu_test``),
so the model stages' tests do not depend on the data stages. Its ``tokens``
column is counted with LLaMA-Factory's own template and Qwen2-VL plugin.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROMPT = "<image>이 이미지를 한국어로 한 문장으로 설명해 주세요."
CAPTIONS = [
    "서울 광장에서 시민들이 깃발을 흔들고 있다.",
    "전통 의상을 입은 아이들이 무대 위에서 춤을 추고 있다.",
    "시장에서 상인이 과일을 팔고 있다.",
    "해변에서 가족이 사진을 찍고 있다.",
    "경기장에서 선수들이 경기를 하고 있다.",
    "박물관 앞에 관광객들이 모여 있다.",
    "강가에서 노인이 책을 읽고 있다.",
    "축제 현장에서 음악가들이 노래를 부르고 있다.",
    "밤 거리에 불빛이 가득하다.",
    "학생들이 학교 앞에서 이야기를 나누고 있다.",
    "요리사가 주방에서 음식을 만들고 있다.",
    "산 위에서 등산객들이 웃고 있다.",
]
# (width, height) per sample: small enough for fast CPU steps, varied so
# the image token counts differ (4 to 12 tokens after Qwen2-VL's resize).
SIZES = [(56, 56), (84, 56), (112, 84), (56, 112), (70, 70), (100, 60)]
DATASET_INFO_COLUMNS = {"messages": "messages", "images": "images"}
DATASET_INFO_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def _image_bytes(index: int) -> bytes:
    from PIL import Image

    width, height = SIZES[index % len(SIZES)]
    image = Image.new("RGB", (width, height))
    pixels = image.load()
    for x in range(width):
        for y in range(height):
            pixels[x, y] = ((x * 7 + index * 40) % 256, (y * 5 + index * 20) % 256, (x * y + index) % 256)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _schema():
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.schema(
        [
            ("messages", pa.list_(message)),
            ("images", pa.list_(image)),
            ("img_id", pa.string()),
            ("line", pa.int64()),
            ("caption", pa.string()),
            ("sha256", pa.string()),
            ("tokens", pa.int64()),
        ]
    )


def count_tokens(model_dir: Path, samples: list[dict], image_max_pixels: int, image_min_pixels: int) -> list[int]:
    """Return each sample's token count (text plus image tokens) as LLaMA-Factory's SFT preprocessing counts it."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from llamafactory.model import load_tokenizer
    from PIL import Image

    model_args = ModelArguments(
        model_name_or_path=str(model_dir), image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels
    )
    module = load_tokenizer(model_args)
    tokenizer, processor = module["tokenizer"], module["processor"]
    template = get_template_and_fix_tokenizer(tokenizer, DataArguments(template="qwen2_vl"))
    counts = []
    for sample in samples:
        images = [Image.open(io.BytesIO(image["bytes"])) for image in sample["images"]]
        messages = template.mm_plugin.process_messages(sample["messages"], images, [], [], processor)
        prompt_ids, response_ids = template.encode_oneturn(tokenizer, messages)
        counts.append(len(prompt_ids) + len(response_ids))
    return counts


def write_dataset(
    root: Path,
    model_dir: Path,
    train: int = 8,
    test: int = 4,
    image_max_pixels: int = 589_824,
    image_min_pixels: int = 1024,
) -> Path:
    """Write a split-stage style dataset with ``train`` + ``test`` samples under ``root`` and return it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = []
    for i in range(train + test):
        caption = CAPTIONS[i % len(CAPTIONS)]
        image = _image_bytes(i)
        samples.append(
            {
                "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": caption}],
                "images": [{"bytes": image, "path": None}],
                "img_id": f"{i:064x}",
                "line": i + 1,
                "caption": caption,
                "sha256": f"{i + 1000:064x}",
            }
        )
    for sample, tokens in zip(samples, count_tokens(model_dir, samples, image_max_pixels, image_min_pixels), strict=True):
        sample["tokens"] = tokens

    root.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", samples[:train]), ("test", samples[train:])):
        (root / name).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(part, schema=_schema()), root / name / "part-00000.parquet")
    info = {
        f"silu_{name}": {
            "file_name": name,
            "formatting": "sharegpt",
            "columns": DATASET_INFO_COLUMNS,
            "tags": DATASET_INFO_TAGS,
        }
        for name in ("train", "test")
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False), encoding="utf-8")
    return root


def write_params(path: Path, train: dict | None = None, **sections: dict) -> Path:
    """Write a params.yaml whose train section is small enough for a CPU test run."""
    import yaml

    train_section = {
        "epochs": 1.0,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "lora_rank": 4,
        "lora_alpha": 8,
        "seed": 7,
        "logging_steps": 1,
    }
    train_section.update(train or {})
    raw = {"train": train_section, **sections}
    path.write_text(yaml.safe_dump(raw, sort_keys=True), encoding="utf-8")
    return path


def run_stage(module: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m stages.<module> ARGS`` from the repository root and return the finished process."""
    # One intra-op thread: the tiny model's training steps take about 0.05 s that way and about
    # 0.8 s with two threads on a busy 2-core machine, where thread synchronisation dominates.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run(
        [sys.executable, "-m", f"stages.{module}", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    if check and process.returncode != 0:
        raise AssertionError(f"stages.{module} exited {process.returncode}:\n{process.stderr[-4000:]}")
    return process


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Tiny split dataset: 8 train and 4 test samples with Korean captions; treat it as read-only."""
    return write_dataset(tmp_path_factory.mktemp("dataset") / "dataset", tiny_model_dir)


@pytest.fixture(scope="session")
def trained_adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_dataset_dir: Path) -> Path:
    """LoRA adapter trained by ``python -m stages.train`` on the tiny dataset; treat it as read-only."""
    work = tmp_path_factory.mktemp("adapter")
    params = write_params(work / "params.yaml")
    out = work / "adapter"
    run_stage("train", tiny_dataset_dir, tiny_model_dir, out, "--params", params, "--metrics", work / "metrics")
    return out


@pytest.fixture(scope="session")
def merged_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, trained_adapter_dir: Path) -> Path:
    """Tiny base with the trained adapter merged by ``python -m stages.merge``; treat it as read-only."""
    work = tmp_path_factory.mktemp("merged")
    params = write_params(work / "params.yaml")
    out = work / "merged"
    run_stage("merge", tiny_model_dir, trained_adapter_dir, out, "--params", params)
    return out
