"""Materialise the base Qwen2-VL checkpoint into ``models/base``.

The source is ``base.source`` in params.yaml:

- ``tiny`` (default): a tiny random Qwen2-VL built offline in seconds. Its
  byte-level BPE tokenizer is trained with ``tokenizers`` on a generated
  Korean/English corpus, the Qwen2-VL special tokens sit at fixed ids, and the
  weights come from ``base.tiny_seed``, so a rebuild gives byte-identical files.
  Tests and CI use it; it produces noise, not captions.
- ``modelscope`` / ``huggingface``: ``snapshot_download`` of ``base.model_id``
  at ``base.revision`` (a commit hash or tag; required).
- ``local``: a copy of ``base.local_path`` after checking that it is a
  Qwen2-VL checkpoint.

Every source is checked the same way: a Qwen2-VL config, a tokenizer, an
image processor, and safetensors files and shard index that are complete
(:mod:`stages.weights`).

Run (CPU, a few seconds)::

    python -m stages.base models/base

The output folder is a Hugging Face checkpoint with tokenizer, processor and
chat template, written to a temporary sibling and renamed into place.

Not covered: hub downloads are not exercised in the tests (no network there);
only their error path is. Other developers' tests import
:func:`build_tiny_model` to get a tokenizer, processor and model.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

from stages.common import StageError, atomic_path, get_logger
from stages.config import BaseParams, ParamsError, load_params
from stages.weights import check_weights

log = get_logger(__name__)

# --------------------------------------------------------------------------- tiny model

# The Qwen2-VL special tokens, in the order (and so the relative ids) of the
# released Qwen2-VL tokenizer. They are appended after the trained BPE vocab.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# BPE vocabulary size before the special tokens. The builder checks that the
# corpus below fills it, so the special token ids never move.
TINY_BPE_VOCAB = 768
TINY_VOCAB = TINY_BPE_VOCAB + len(SPECIAL_TOKENS)
# Embedding rows; a multiple of 64 as in the released checkpoints.
TINY_EMBEDDINGS = 832


def special_token_id(token: str) -> int:
    """Return the fixed id of a Qwen2-VL special token in the tiny tokenizer."""
    return TINY_BPE_VOCAB + SPECIAL_TOKENS.index(token)


# The chat template of Qwen/Qwen2-VL-2B-Instruct (its tokenizer_config.json),
# so generation outside LLaMA-Factory formats prompts as the real model expects.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_KO_SUBJECTS = [
    "사람들이", "아이들이", "한 남자가", "한 여자가", "학생들이", "관광객들이", "선수들이", "시민들이",
    "가족이", "노인이", "군인들이", "기자들이", "상인들이", "농부가", "요리사가", "음악가들이",
]
_KO_PLACES = [
    "서울 시내에서", "광장에서", "시장에서", "해변에서", "공원에서", "경기장에서", "무대 위에서",
    "거리에서", "박물관에서", "학교 앞에서", "산 위에서", "강가에서", "회의장에서", "축제 현장에서",
]
_KO_ACTIONS = [
    "사진을 찍고 있다", "전통 의상을 입고 춤을 추고 있다", "이야기를 나누고 있다", "음식을 팔고 있다",
    "행진하고 있다", "공연을 보고 있다", "깃발을 흔들고 있다", "경기를 하고 있다", "노래를 부르고 있다",
    "기념식에 참석하고 있다", "책을 읽고 있다", "걷고 있다", "웃고 있다", "악수를 하고 있다",
]
_KO_EXTRAS = [
    "이 사진은", "이미지에는", "배경에는", "오른쪽에는", "왼쪽에는", "하늘은 맑고", "건물이 보이며",
    "많은 사람들이 모여", "한국의 전통 문화를 보여 준다", "뉴스 사진이다", "밤 풍경이다",
]
_EN_WORDS = [
    "the", "a", "image", "shows", "people", "in", "on", "at", "with", "street", "city", "festival", "traditional",
    "dress", "market", "photo", "of", "and", "man", "woman", "children", "stadium", "crowd", "flag", "building",
    "night", "describe", "this", "picture", "briefly", "Korean", "news", "culture", "river", "mountain",
]
_PROMPTS = [
    "이 이미지를 한국어로 설명해 주세요.",
    "사진에 무엇이 보이나요?",
    "Describe this image in Korean.",
    "What is shown in the picture?",
]


def tiny_corpus(lines: int = 600, seed: int = 0) -> list[str]:
    """Generate the deterministic Korean/English text the tiny tokenizer is trained on."""
    rng = random.Random(seed)
    corpus = list(_PROMPTS)
    for i in range(lines):
        if i % 4 == 3:
            words = rng.choices(_EN_WORDS, k=rng.randint(5, 12))
            corpus.append(" ".join(words).capitalize() + ".")
            continue
        parts = [rng.choice(_KO_EXTRAS), rng.choice(_KO_PLACES), rng.choice(_KO_SUBJECTS), rng.choice(_KO_ACTIONS)]
        sentence = " ".join(parts) + "."
        if rng.random() < 0.3:
            sentence += f" {rng.randint(1, 2025)}년 {rng.randint(1, 12)}월."
        corpus.append(sentence)
    return corpus


def _train_tokenizer(corpus: list[str]):
    """Train a Qwen2-style byte-level BPE and wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    if len(vocab) != TINY_BPE_VOCAB:
        raise StageError(
            f"tiny tokenizer: BPE training gave {len(vocab)} tokens, expected {TINY_BPE_VOCAB}; "
            "the generated corpus is too small for TINY_BPE_VOCAB."
        )
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in model["merges"]]
    vocab = dict(vocab)
    for token in SPECIAL_TOKENS:
        vocab[token] = special_token_id(token)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    for token in SPECIAL_TOKENS:
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != special_token_id(token):
            raise StageError(f"tiny tokenizer: {token} got id {actual}, expected {special_token_id(token)}.")
    return tokenizer


def _tiny_config():
    from transformers import Qwen2VLConfig

    text_hidden = 64
    heads = 4
    # mrope splits each head's rotary half (head_dim / 2 = 8) into temporal,
    # height and width sections; Qwen2-VL requires the sections to sum to it.
    mrope_section = [2, 3, 3]
    assert sum(mrope_section) == text_hidden // heads // 2
    return Qwen2VLConfig(
        text_config={
            "vocab_size": TINY_EMBEDDINGS,
            "hidden_size": text_hidden,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            "bos_token_id": special_token_id("<|endoftext|>"),
            "eos_token_id": special_token_id("<|im_end|>"),
            "pad_token_id": special_token_id("<|endoftext|>"),
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "hidden_size": text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=special_token_id("<|image_pad|>"),
        video_token_id=special_token_id("<|video_pad|>"),
        vision_start_token_id=special_token_id("<|vision_start|>"),
        vision_end_token_id=special_token_id("<|vision_end|>"),
        bos_token_id=special_token_id("<|endoftext|>"),
        eos_token_id=special_token_id("<|im_end|>"),
        pad_token_id=special_token_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL checkpoint (model, tokenizer, processor) into ``out_dir``.

    The same ``seed`` gives byte-identical files. ``out_dir`` is created; files
    already in it are overwritten, others are left alone.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(tiny_corpus())
    config = _tiny_config()

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=special_token_id("<|endoftext|>"),
        eos_token_id=[special_token_id("<|im_end|>"), special_token_id("<|endoftext|>")],
        pad_token_id=special_token_id("<|endoftext|>"),
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    # Pixel limits and normalisation of the released Qwen2-VL processor.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- checkpoint checks


def check_checkpoint(folder: Path, origin: str) -> None:
    """Raise :class:`StageError` unless ``folder`` contains a Qwen2-VL checkpoint with its processor and valid weights."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise StageError(f"{origin}: {config_path} not found; the folder is not a Hugging Face checkpoint.")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{origin}: {config_path} is not valid JSON: {exc}") from None
    model_type = config.get("model_type")
    if model_type != "qwen2_vl":
        raise StageError(
            f"{origin}: {config_path} has model_type {model_type!r}, expected 'qwen2_vl'. "
            "The pipeline trains Qwen2-VL only (e.g. Qwen/Qwen2-VL-2B-Instruct)."
        )
    required = {
        "weights (*.safetensors)": any(folder.glob("*.safetensors")),
        "tokenizer (tokenizer.json or vocab.json + merges.txt)": (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()),
        # transformers 5 writes processor_config.json; releases ship preprocessor_config.json.
        "image processor (preprocessor_config.json or processor_config.json)": (
            (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file()
        ),
    }
    missing = [name for name, present in required.items() if not present]
    if missing:
        raise StageError(f"{origin}: {folder} has no {', no '.join(missing)}; use a complete Qwen2-VL checkpoint.")
    # Truncated or missing shards would otherwise fail only at train, after convert has run.
    check_weights(folder, f"The checkpoint from {origin} is incomplete; copy or download it again.")


def _copy_checkpoint(src: Path, dest: Path) -> None:
    """Copy a checkpoint folder, leaving out hidden entries (hub caches, .git)."""
    shutil.copytree(src, dest, symlinks=False, ignore=lambda _dir, names: [n for n in names if n.startswith(".")])


# --------------------------------------------------------------------------- sources


_HUBS = {
    "modelscope": "modelscope.cn",
    "huggingface": "huggingface.co (or HF_ENDPOINT; HF_HUB_OFFLINE must be unset)",
}


def _from_hub(hub: str, model_id: str, revision: str, dest: Path) -> None:
    if hub == "modelscope":
        from modelscope import snapshot_download
    else:
        from huggingface_hub import snapshot_download

    origin = f"base.source {hub} ({model_id}@{revision})"
    download = dest.parent / f"{dest.name}.download"
    try:
        snapshot_download(model_id, revision=revision, local_dir=str(download))
    except Exception as exc:  # noqa: BLE001 - offline mode, HTTP and file errors of either client all mean "no download"
        raise StageError(
            f"{origin}: download failed: {type(exc).__name__}: {exc}. Check that {_HUBS[hub]} is reachable "
            "and that the id and revision exist, or download the folder elsewhere and set "
            "`base.source: local` with `base.local_path`."
        ) from exc
    check_checkpoint(download, origin)
    if any(path.is_symlink() for path in download.rglob("*")):
        # Links into a hub cache: copy the files they point to, so DVC tracks real files.
        _copy_checkpoint(download, dest)
        return
    # The download already sits in the stage's temporary folder: move it rather than copy
    # gigabytes, after dropping the hub clients' hidden bookkeeping (.cache, .msc, .mv).
    for entry in download.iterdir():
        if not entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    download.rename(dest)


def _from_local(local_path: str, dest: Path) -> None:
    origin = f"base.local_path {local_path!r}"
    src = Path(local_path)
    if not src.is_dir():
        raise StageError(f"{origin}: folder not found; set `base.local_path` to a Qwen2-VL checkpoint folder.")
    check_checkpoint(src, origin)
    _copy_checkpoint(src, dest)


def materialise(params: BaseParams, out_dir: str | Path) -> Path:
    """Write the base checkpoint chosen by ``params`` to ``out_dir``, atomically."""
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        if params.source == "tiny":
            log.info("building the tiny random Qwen2-VL (seed %d) into %s", params.tiny_seed, out_dir)
            build_tiny_model(tmp, seed=params.tiny_seed)
        elif params.source in _HUBS:
            log.info("downloading %s@%s from %s", params.model_id, params.revision, params.source)
            _from_hub(params.source, params.model_id, params.revision, tmp)
        else:
            log.info("copying the local checkpoint %s", params.local_path)
            _from_local(params.local_path, tmp)
        check_checkpoint(tmp, f"base.source {params.source}")
    log.info("base model ready in %s", out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.base", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="base model output folder")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        materialise(load_params(args.params).base, args.out)
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
