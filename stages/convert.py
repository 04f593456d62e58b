"""Turn filtered images and captions into ShareGPT samples that fit LLaMA-Factory's token budget.

Run from the repository root (reads ``params.yaml``: ``data.lang``,
``convert.*`` and ``train.template``)::

    python -m stages.convert data/filtered data/converted models/base

Each sample is one user turn, ``<image>`` followed by a prompt in the
caption's language (:mod:`stages.prompts`), and one assistant turn, the
cleaned caption. The caption is NFC-normalised and stripped of HTML tags,
entities, control characters and extra whitespace. Any image, video or
audio placeholder or tokenizer special token in it is removed, so the
number of ``<image>`` placeholders always equals the number of images,
which LLaMA-Factory requires (it raises a ValueError otherwise).

A sample's token count (text through the chat template plus image tokens,
:mod:`stages.tokens`) must not exceed ``convert.cutoff_len``. LLaMA-Factory
would truncate a longer sample through its image tokens and crash, so such
samples are dropped.

Output in the output folder:

- ``samples/part-NNNNN.parquet``: ``messages``, ``images`` (one
  ``{bytes, path}``), ``img_id``, ``line``, ``caption``, ``sha256``, ``tokens``;
- ``dataset_info.json`` with the entry ``silu``;
- ``manifest.jsonl``: one line per input record (``line``, ``img_id``,
  ``status``, ``reason``, ``detail``);

and the counts in ``metrics/convert.json``.

Not covered: captions are not checked for language or content; a caption
in another language than ``data.lang`` is kept unless its record says so.
"""

from __future__ import annotations

import argparse
import functools
import html
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pyarrow as pa

from stages.common import DropCounter, RateLogger, StageError, atomic_path, get_logger, write_json
from stages.config import ConvertParams, ParamsError, load_params
from stages.parts import ManifestWriter, RotatingPartWriter, dataset_entry, iter_rows, list_parts
from stages.prompts import choose_prompt
from stages.tokens import TokenCounter

log = get_logger(__name__)

# Drop reasons written to the manifest and to metrics/convert.json.
BLANK_CAPTION = "blank caption"
OTHER_LANGUAGE = "other language"
OVER_BUDGET = "over token budget"

# The placeholders LLaMA-Factory 0.9.5 replaces with media tokens
# (llamafactory.extras.constants, unless overridden by environment variables).
PLACEHOLDERS = ("<image>", "<video>", "<audio>")

SAMPLE_SCHEMA = pa.schema(
    [
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("img_id", pa.string()),
        ("line", pa.int64()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("tokens", pa.int32()),
    ]
)

INPUT_COLUMNS = ["line", "img_id", "caption", "lang", "image", "width", "height", "sha256"]


# --------------------------------------------------------------------------- caption cleaning

# An HTML comment or a start, end or self-closing tag. A "<" must be followed
# by a letter, so text such as "a < b" or "<3" is left alone.
_MARKUP = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>", re.DOTALL)
# Any Qwen-style special token, including ones this tokenizer does not define.
_SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>")


def _clean_characters(text: str) -> str:
    """Turn control characters into spaces and drop lone surrogates and byte-order marks.

    Surrogates cannot be written as UTF-8, so parquet would reject them.
    """
    out = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc":
            out.append(" ")
        elif category != "Cs" and char != "\ufeff":
            out.append(char)
    return "".join(out)


@functools.lru_cache(maxsize=8)
def _token_pattern(forbidden: tuple[str, ...]) -> re.Pattern:
    tokens = [t for t in {*PLACEHOLDERS, *forbidden} if t and not any(c.isspace() for c in t)]
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def clean_caption(text: str | None, forbidden: tuple[str, ...] = ()) -> str:
    """Return ``text`` as one line of plain NFC text with no placeholder or special token left.

    ``forbidden`` lists more strings to remove, such as the tokenizer's added
    tokens. Every removed piece is replaced by a space before whitespace is
    collapsed, so removing one can never join two halves into a new one.
    """
    if not isinstance(text, str):
        return ""

    text = unicodedata.normalize("NFC", text)
    text = _clean_characters(text)
    text = _MARKUP.sub(" ", text)
    # Entities are decoded after the tags are stripped, so escaped markup such
    # as "&lt;br&gt;" becomes a tag and is stripped in the second pass.
    text = html.unescape(text)
    text = _clean_characters(text)
    text = _MARKUP.sub(" ", text)
    text = _SPECIAL_TOKEN.sub(" ", text)
    text = _token_pattern(forbidden).sub(" ", text)
    text = " ".join(text.split())
    return unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------- stage


def build_messages(prompt: str, caption: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": PLACEHOLDERS[0] + prompt},
        {"role": "assistant", "content": caption},
    ]


def run_convert(
    in_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path,
    params: ConvertParams,
    lang: str,
    template: str,
    metrics_path: str | Path,
) -> DropCounter:
    """Convert every row of the filter output in ``in_dir`` into ShareGPT samples in ``out_dir``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    parts = list_parts(in_dir, "filter")
    token_counter = TokenCounter(model_dir, template, params.image_max_pixels, params.image_min_pixels)
    forbidden = tuple(token_counter.special_tokens)
    log.info("convert: %d parts from %s, template %s, cutoff_len %d", len(parts), in_dir, template, params.cutoff_len)

    counter = DropCounter()
    progress = RateLogger(log, "convert")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        samples = RotatingPartWriter(tmp / "samples", SAMPLE_SCHEMA, params.shard_size)
        with ManifestWriter(tmp / "manifest.jsonl") as manifest:
            for done, row in enumerate(iter_rows(parts, INPUT_COLUMNS), 1):
                reason, detail, sample = _convert_row(row, params, lang, forbidden, token_counter)
                if reason is None:
                    counter.keep()
                    samples.add(sample)
                else:
                    counter.drop(reason)
                entry = {
                    "line": row["line"],
                    "img_id": row["img_id"],
                    "status": "ok" if reason is None else "dropped",
                    "reason": reason,
                    "detail": detail,
                }
                manifest.write(entry)
                progress.update(done, counter)
        samples.close()
        write_json(tmp / "dataset_info.json", {"silu": dataset_entry("samples")})
    progress.update(counter.total, counter, force=True)
    if counter.kept == 0:
        log.warning("convert: no sample kept out of %d; see %s", counter.total, out_dir / "manifest.jsonl")

    write_json(metrics_path, counter.metrics())
    return counter


def _convert_row(
    row: dict[str, Any], params: ConvertParams, lang: str, forbidden: tuple[str, ...], token_counter: TokenCounter
) -> tuple[str | None, str | None, dict[str, Any] | None]:
    """Return ``(reason, detail, sample)``: a drop reason and detail, or the sample to write."""
    if row["lang"] and row["lang"] != lang:
        return OTHER_LANGUAGE, f"caption language {row['lang']!r}, data.lang {lang!r}", None
    caption = clean_caption(row["caption"], forbidden)
    if not caption:
        return BLANK_CAPTION, f"caption before cleaning: {str(row['caption'])[:80]!r}", None

    messages = build_messages(choose_prompt(lang, row["img_id"], params.prompt_seed), caption)
    tokens = token_counter.count(messages, [(row["width"], row["height"])])
    if tokens > params.cutoff_len:
        return OVER_BUDGET, f"{tokens} tokens > convert.cutoff_len {params.cutoff_len}", None

    sample = {
        "messages": messages,
        "images": [{"bytes": row["image"], "path": f"{row['img_id']}.jpg"}],
        "img_id": row["img_id"],
        "line": row["line"],
        "caption": caption,
        "sha256": row["sha256"],
        "tokens": tokens,
    }
    return None, None, sample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.convert", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="filter output folder (part-NNNNN.parquet)")
    parser.add_argument("output", type=Path, help="folder to write samples/, dataset_info.json and manifest.jsonl to")
    parser.add_argument("model", type=Path, help="base model folder whose tokenizer and processor count tokens")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--metrics", default="metrics/convert.json", help="metrics file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        run_convert(
            args.input, args.output, args.model, params.convert, params.data.lang, params.train.template, args.metrics
        )
    except (ParamsError, StageError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
