"""Tests for stages.convert, stages.tokens and stages.prompts.

Token counts are checked against LLaMA-Factory 0.9.5's own preprocessing of
the real image bytes, on the tiny random Qwen2-VL that ``stages.base``
builds offline. The last test runs filter, convert and split on a generated
corpus and loads the result with ``llamafactory.data.get_dataset``, the
loader training uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.common import StageError
from stages.config import LANGUAGES, ConvertParams, FilterParams, SplitParams
from stages.convert import clean_caption, main, run_convert
from stages.filter import SCHEMA as FILTERED_SCHEMA
from stages.prompts import PROMPTS, choose_prompt
from stages.tokens import TokenCounter

TEMPLATE = "qwen2_vl"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.base import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("base") / "model", seed=0)


@pytest.fixture(scope="module")
def counter(base_model: Path) -> TokenCounter:
    params = ConvertParams()
    return TokenCounter(base_model, TEMPLATE, params.image_max_pixels, params.image_min_pixels)


@pytest.fixture(scope="module")
def llamafactory_length(counter: TokenCounter):
    """Return a function giving the ``input_ids`` length LLaMA-Factory builds from a sample with real images."""
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.hparams import DataArguments

    processor = SupervisedDatasetProcessor(
        template=counter.template,
        tokenizer=counter.tokenizer,
        processor=counter.processor,
        data_args=DataArguments(template=TEMPLATE, cutoff_len=1_000_000),
    )

    def length(sample: dict[str, Any]) -> int:
        messages = sample["messages"]
        input_ids, _ = processor._encode_data_example(
            prompt=messages[:-1], response=messages[-1:], system="", tools="",
            images=sample["images"], videos=[], audios=[],
        )
        return len(input_ids)

    return length


def jpeg(size: tuple[int, int], seed: int = 0) -> bytes:
    image = Image.effect_noise(size, 40 + seed).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def filtered_row(line: int, caption: Any, size: tuple[int, int] = (64, 48), lang: str = "ko") -> dict[str, Any]:
    """Return one row of the filter stage's output."""
    data = jpeg(size, line)
    return {
        "line": line,
        "img_id": f"id{line:04d}",
        "caption": caption,
        "lang": lang,
        "categories": "{}",
        "image": data,
        "width": size[0],
        "height": size[1],
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_filtered(folder: Path, rows: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=FILTERED_SCHEMA), folder / "part-00000.parquet")
    return folder


def convert(tmp_path: Path, base_model: Path, rows: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
    """Run convert on ``rows``; return samples, manifest and metrics."""
    write_filtered(tmp_path / "filtered", rows)
    run_convert(
        tmp_path / "filtered", tmp_path / "converted", base_model, ConvertParams(**params), "ko", TEMPLATE,
        tmp_path / "convert.json",
    )
    samples = []
    for part in sorted((tmp_path / "converted" / "samples").glob("part-*.parquet")):
        samples.extend(pq.read_table(part).to_pylist())
    manifest = (tmp_path / "converted" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return {
        "samples": samples,
        "manifest": [json.loads(line) for line in manifest],
        "metrics": json.loads((tmp_path / "convert.json").read_text()),
    }


# --------------------------------------------------------------------------- samples


def test_sample_exact_dict(tmp_path: Path, base_model: Path, llamafactory_length) -> None:
    row = filtered_row(1, "  서울 광장에서 시민들이\n깃발을 흔들고 있다. ")
    (sample,) = convert(tmp_path, base_model, [row])["samples"]
    expected = {
        "messages": [
            {"role": "user", "content": "<image>사진 속 장면을 묘사해 주세요."},
            {"role": "assistant", "content": "서울 광장에서 시민들이 깃발을 흔들고 있다."},
        ],
        "images": [{"bytes": row["image"], "path": "id0001.jpg"}],
        "img_id": "id0001",
        "line": 1,
        "caption": "서울 광장에서 시민들이 깃발을 흔들고 있다.",
        "sha256": row["sha256"],
        "tokens": llamafactory_length(sample),
    }
    assert sample == expected


def test_dataset_info_exact(tmp_path: Path, base_model: Path) -> None:
    convert(tmp_path, base_model, [filtered_row(1, "캡션")])
    info = json.loads((tmp_path / "converted" / "dataset_info.json").read_text())
    assert info == {
        "silu": {
            "file_name": "samples",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }


def test_placeholders_neutralised(tmp_path: Path, base_model: Path, counter: TokenCounter) -> None:
    caption = "사진 <image> 속 <video><audio> 장면 <|im_end|><|vision_start|><|image_pad|> &lt;image&gt; <ima<image>ge>"
    (sample,) = convert(tmp_path, base_model, [filtered_row(1, caption)])["samples"]
    answer = sample["messages"][1]["content"]
    # "<ima<image>ge>" must not close up into a new "<image>"; what is left,
    # "<ima ge>", reads as a tag and is stripped too.
    assert answer == "사진 속 장면"
    assert sum(m["content"].count("<image>") for m in sample["messages"]) == len(sample["images"]) == 1
    for token in counter.special_tokens:
        assert token not in answer


def test_blank_captions_dropped(tmp_path: Path, base_model: Path) -> None:
    captions = ["", "   \n\t", "<br/>", "<image>", "&nbsp;<p></p>", None, "<|im_end|>", "정상 캡션"]
    result = convert(tmp_path, base_model, [filtered_row(i, c) for i, c in enumerate(captions, 1)])
    reasons = [entry["reason"] for entry in result["manifest"]]
    assert reasons == ["blank caption"] * 7 + [None]
    assert [s["caption"] for s in result["samples"]] == ["정상 캡션"]
    assert result["manifest"][2]["detail"] == "caption before cleaning: '<br/>'"


def test_unknown_template_rejected(tmp_path: Path, base_model: Path) -> None:
    write_filtered(tmp_path / "filtered", [filtered_row(1, "정상 캡션")])

    with pytest.raises(StageError, match=r"`train.template` is 'nonsense'") as caught:
        run_convert(
            tmp_path / "filtered", tmp_path / "converted", base_model, ConvertParams(), "ko", "nonsense",
            tmp_path / "convert.json",
        )  # fmt: skip
    assert "qwen2_vl" in str(caught.value)
    assert not (tmp_path / "converted").exists()


def test_other_language_dropped(tmp_path: Path, base_model: Path) -> None:
    result = convert(tmp_path, base_model, [filtered_row(1, "Фото", lang="ru"), filtered_row(2, "사진")])
    assert result["manifest"][0]["reason"] == "other language"
    assert result["manifest"][0]["detail"] == "caption language 'ru', data.lang 'ko'"
    assert [s["line"] for s in result["samples"]] == [2]


SIZES = [(28, 28), (64, 48), (30, 500), (500, 30), (777, 333), (1000, 700), (2000, 1500), (4000, 200)]


def test_tokens_match_llamafactory(tmp_path: Path, base_model: Path, llamafactory_length) -> None:
    long_caption = "한 남자가 시장에서 과일을 팔고 있다. " * 20
    rows = [filtered_row(i, long_caption if i % 2 else "짧은 캡션", size) for i, size in enumerate(SIZES, 1)]
    samples = convert(tmp_path, base_model, rows, cutoff_len=100_000)["samples"]
    assert len(samples) == len(SIZES)
    for sample, size in zip(samples, SIZES, strict=True):
        assert sample["tokens"] == llamafactory_length(sample), size


def test_image_tokens_follow_resize(counter: TokenCounter) -> None:
    # 600x400 is under image_max_pixels (768*768), and smart_resize rounds it
    # to 588x392: (588/28) * (392/28) = 21 * 14.
    assert counter.image_tokens(600, 400) == 21 * 14
    # 2000x1500 is first scaled to 886x665 (LLaMA-Factory), then to 896x672.
    assert counter.image_tokens(2000, 1500) == 32 * 24
    # 28x28 is below image_min_pixels (32*32), scaled to 32x32, then raised
    # to the processor's 56*56 minimum.
    assert counter.image_tokens(28, 28) == 4


def test_over_budget_dropped_at_boundary(tmp_path: Path, base_model: Path) -> None:
    rows = [filtered_row(1, "경기장에서 선수들이 경기를 하고 있다.", (600, 400))]
    tokens = convert(tmp_path / "a", base_model, rows, cutoff_len=100_000)["samples"][0]["tokens"]

    kept = convert(tmp_path / "b", base_model, rows, cutoff_len=tokens)
    assert [s["tokens"] for s in kept["samples"]] == [tokens]

    dropped = convert(tmp_path / "c", base_model, rows, cutoff_len=tokens - 1)
    assert dropped["samples"] == []
    assert dropped["manifest"][0]["reason"] == "over token budget"
    assert dropped["manifest"][0]["detail"] == f"{tokens} tokens > convert.cutoff_len {tokens - 1}"


def test_manifest_and_metrics_add_up(tmp_path: Path, base_model: Path) -> None:
    rows = [filtered_row(1, "캡션 하나"), filtered_row(2, ""), filtered_row(3, "캡션 셋", (2000, 2000))]
    result = convert(tmp_path, base_model, rows, cutoff_len=200)
    assert [e["line"] for e in result["manifest"]] == [1, 2, 3]
    assert [e["status"] for e in result["manifest"]] == ["ok", "dropped", "dropped"]
    assert result["metrics"] == {
        "records": 3,
        "kept": 1,
        "dropped": 2,
        "drop_rate": round(2 / 3, 6),
        "dropped_by_reason": {"blank caption": 1, "over token budget": 1},
    }


def test_shard_size_starts_new_parts(tmp_path: Path, base_model: Path) -> None:
    convert(tmp_path, base_model, [filtered_row(i, f"캡션 {i}") for i in range(1, 6)], shard_size=2)
    parts = sorted((tmp_path / "converted" / "samples").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in parts] == [2, 2, 1]


def test_missing_model_names_base_stage(tmp_path: Path) -> None:
    write_filtered(tmp_path / "filtered", [filtered_row(1, "캡션")])
    with pytest.raises(StageError, match="run the base stage first"):
        run_convert(
            tmp_path / "filtered", tmp_path / "out", tmp_path / "no-model", ConvertParams(), "ko", TEMPLATE,
            tmp_path / "m.json",
        )


def test_main_reads_params(tmp_path: Path, base_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_filtered(tmp_path / "filtered", [filtered_row(1, "캡션")])
    (tmp_path / "params.yaml").write_text("convert:\n  prompt_seed: 3\n")
    monkeypatch.chdir(tmp_path)
    assert main(["filtered", "converted", str(base_model)]) == 0
    sample = pq.read_table(tmp_path / "converted" / "samples" / "part-00000.parquet").to_pylist()[0]
    assert sample["messages"][0]["content"] == "<image>" + choose_prompt("ko", "id0001", 3)
    assert json.loads((tmp_path / "metrics" / "convert.json").read_text())["kept"] == 1


# --------------------------------------------------------------------------- caption cleaning


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("  여러   칸의\t공백\n줄바꿈  ", "여러 칸의 공백 줄바꿈"),
        (unicodedata.normalize("NFD", "한국어 캡션"), "한국어 캡션"),
        ("<p>문단</p><br/>다음 <b>굵게</b>", "문단 다음 굵게"),
        ("<!-- 주석 -->본문", "본문"),
        ("A &amp; B &quot;C&quot; &#39;D&#39; E&nbsp;F", "A & B \"C\" 'D' E F"),
        ("&lt;br&gt;이중 이스케이프", "이중 이스케이프"),
        ("제어\x00문자\x07와\x1bESC", "제어 문자 와 ESC"),
        ("\ufeffBOM과 \ud800 서로게이트", "BOM과 서로게이트"),
        ("a < b and c > d, <3", "a < b and c > d, <3"),
        ("<image><video><audio>남은 글", "남은 글"),
        ("<|endoftext|>토큰<|box_start|>(1,2)<|box_end|>", "토큰 (1,2)"),
        ("<|unknown_future_token|>텍스트", "텍스트"),
    ],
)
def test_clean_caption(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_clean_caption_uses_tokenizer_tokens() -> None:
    assert clean_caption("앞 [SPECIAL] 뒤", ("[SPECIAL]",)) == "앞 뒤"


def test_clean_caption_non_string_is_blank() -> None:
    assert clean_caption(None) == ""


# --------------------------------------------------------------------------- prompts


def test_prompts_cover_every_language() -> None:
    assert set(PROMPTS) == LANGUAGES
    for lang, phrasings in PROMPTS.items():
        assert len(phrasings) >= 4, lang
        assert len(set(phrasings)) == len(phrasings), lang


def test_prompts_are_clean_text() -> None:
    for lang, phrasings in PROMPTS.items():
        for prompt in phrasings:
            assert prompt == unicodedata.normalize("NFC", prompt), (lang, prompt)
            assert prompt == clean_caption(prompt), (lang, prompt)


def test_prompt_choice_fixed_by_seed() -> None:
    first = [choose_prompt("ko", f"id{i}", 0) for i in range(200)]
    assert first == [choose_prompt("ko", f"id{i}", 0) for i in range(200)]
    assert first != [choose_prompt("ko", f"id{i}", 1) for i in range(200)]
    assert set(first) == set(PROMPTS["ko"])


def test_prompt_unknown_language_raises() -> None:
    with pytest.raises(KeyError, match="no prompts for language 'xx'"):
        choose_prompt("xx", "id", 0)


# --------------------------------------------------------------------------- end to end


def test_llamafactory_loads_split_dataset(tmp_path: Path, base_model: Path) -> None:
    """Run filter, convert and split on a generated corpus and load train and test with LLaMA-Factory."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    from stages.filter import run_filter
    from stages.split import run_split
    from tests.test_filter import CASES, download_record, write_shard

    images = [data for _, data, reason, _, _ in CASES if reason is None]
    images += [jpeg((300 + 10 * i, 200), i) for i in range(6)]
    records = [(download_record(i, data, f"캡션 번호 {i}"), data) for i, data in enumerate(images, 1)]
    write_shard(tmp_path / "downloaded", 0, records)
    run_filter(tmp_path / "downloaded", tmp_path / "filtered", FilterParams(workers=1), tmp_path / "filter.json")
    convert_params = ConvertParams()
    run_convert(
        tmp_path / "filtered", tmp_path / "converted", base_model, convert_params, "ko", TEMPLATE,
        tmp_path / "convert.json",
    )
    run_split(tmp_path / "converted", tmp_path / "dataset", SplitParams(test_size=3), 4, tmp_path / "split.json")

    expected: dict[str, list[int]] = {}
    for name in ("train", "test"):
        rows = []
        for part in sorted((tmp_path / "dataset" / name).glob("part-*.parquet")):
            rows.extend(pq.read_table(part, columns=["tokens"]).to_pylist())
        expected[name] = [row["tokens"] for row in rows]
    assert len(expected["test"]) == 3
    assert len(expected["train"]) == len(images) - 3

    model_args, data_args, training_args, _, _ = get_train_args(
        {
            "model_name_or_path": str(base_model),
            "stage": "sft",
            "do_train": True,
            "finetuning_type": "lora",
            "template": TEMPLATE,
            "dataset": "silu_train",
            "eval_dataset": "silu_test",
            "dataset_dir": str(tmp_path / "dataset"),
            "cutoff_len": convert_params.cutoff_len,
            "image_max_pixels": convert_params.image_max_pixels,
            "image_min_pixels": convert_params.image_min_pixels,
            "output_dir": str(tmp_path / "train"),
            "cache_dir": str(tmp_path / "hf-cache"),
            "report_to": "none",
        }
    )
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    datasets = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)

    # LLaMA-Factory reads a folder's files in os.listdir order, so the parts
    # (4 rows each here) come back in arbitrary order: compare sorted lengths.
    assert sorted(len(ids) for ids in datasets["train_dataset"]["input_ids"]) == sorted(expected["train"])
    assert sorted(len(ids) for ids in datasets["eval_dataset"]["input_ids"]) == sorted(expected["test"])
