"""Stream a WanJuan-SiLu image-caption JSONL file as one result per input line.

Every input line yields exactly one :class:`LineResult`: a parsed
:class:`SiluRecord`, or a drop reason from :data:`DROP_REASONS` with a detail
that names the line and the value. The download stage counts these results,
so its ``records`` metric equals the number of input lines.

The file is read line by line, plain or gzip-compressed (detected from the
first bytes, not the file name), so memory does not grow with the file. The
exception is duplicate detection, which keeps an 8-byte hash of every kept
``img_id`` (about 70 bytes per record in a Python set).

Check a file by hand::

    python -m stages.records data/sample/ko_sample.jsonl [LANG]

Covered:

- a UTF-8 BOM, CRLF line ends, blank lines and lines over :data:`MAX_LINE_BYTES`;
- invalid JSON or UTF-8 (the detail names the line and column), a key repeated
  within one object (json.loads would keep the last value silently), and lines
  that are JSON but not objects;
- a string anywhere in the line with a lone surrogate escape (``"\\ud800"``),
  which json.loads accepts but UTF-8 cannot encode, so the manifest could not
  be written;
- missing or ill-typed required fields, and captions that are blank or only markup;
- a ``captions.lang`` other than ``data.lang``;
- a repeated ``img_id``, where the first valid record is kept;
- ``data.limit``.

Not covered: captions are kept verbatim (no markup stripping, no check that the
text is really in the tagged language), and ``image.path`` is not checked here;
the download stage resolves it.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# A SiLu record is about 500 bytes. A longer line is read in pieces and
# dropped, so one corrupt line without newlines cannot fill the memory.
MAX_LINE_BYTES = 1 << 20

BLANK_LINE = "blank line"
INVALID_JSON = "invalid json"
NOT_AN_OBJECT = "not an object"
LINE_TOO_LONG = "line too long"
MISSING_FIELD = "missing field"
INVALID_FIELD = "invalid field"
BLANK_CAPTION = "blank caption"
WRONG_LANGUAGE = "wrong language"
DUPLICATE_ID = "duplicate id"

DROP_REASONS = (
    BLANK_LINE,
    INVALID_JSON,
    NOT_AN_OBJECT,
    LINE_TOO_LONG,
    MISSING_FIELD,
    INVALID_FIELD,
    BLANK_CAPTION,
    WRONG_LANGUAGE,
    DUPLICATE_ID,
)

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_TAG = re.compile(r"<[^<>]*>")
# Whitespace that str.strip() keeps: zero-width space, joiners and BOM.
_INVISIBLE = str.maketrans("", "", "\u200b\u200c\u200d\u2060\ufeff")


@dataclass(frozen=True)
class SiluRecord:
    """One valid SiLu image-caption record."""

    img_id: str
    image_path: str  # URL, or a path relative to `data.image_root`
    caption: str  # verbatim, surrounding whitespace removed
    lang: str
    resolution: tuple[int, int] | None  # [width, height] as published; None when absent or invalid
    size_kib: float | None
    image_format: str | None
    categories: dict[str, list[str]] = field(default_factory=dict)  # level1 / level2 category names


@dataclass(frozen=True)
class LineResult:
    """The outcome of one input line: a record, or a drop reason and detail.

    ``img_id`` and ``image_path`` are filled whenever the line had them, also
    for dropped lines, so a manifest can show which record was lost.
    """

    line: int  # 1-based line number in the source file
    raw: bytes  # the line as read, without the newline (truncated for `line too long`)
    record: SiluRecord | None = None
    reason: str | None = None
    detail: str | None = None
    img_id: str | None = None
    image_path: str | None = None

    @property
    def ok(self) -> bool:
        return self.record is not None


class SourceError(RuntimeError):
    """The source file cannot be read to the end; the message names the file and the fix."""


class _FieldError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- reading


def open_source(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading, decompressing it when it starts with the gzip magic bytes."""
    with open(path, "rb") as probe:
        head = probe.read(len(_GZIP_MAGIC))
    if head == _GZIP_MAGIC:
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_lines(stream: BinaryIO) -> Iterator[tuple[bytes, bool]]:
    """Yield ``(line, too_long)`` per line, without the line ending, reading at most MAX_LINE_BYTES at once.

    Lines are split on ``\\n`` only, so U+2028 or a stray ``\\r`` inside a
    line never splits a record (``str.splitlines`` would).
    """
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            head = line[:200]
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_LINE_BYTES + 1)
            yield head, True
            continue
        yield line.rstrip(b"\r\n"), False


def count_lines(path: str | Path, limit: int = 0) -> int:
    """Return the number of lines :func:`iter_lines` will yield for ``path``."""
    count = 0
    for _ in _lines_of(path, limit):
        count += 1
    return count


def iter_lines(path: str | Path, lang: str, limit: int = 0) -> Iterator[LineResult]:
    """Yield one :class:`LineResult` per line of ``path``, in file order.

    ``lang`` is the expected ``captions.lang``; ``limit`` > 0 stops after that
    many lines (blank and invalid lines count too). Raises :class:`SourceError`
    when the file cannot be read to the end (a truncated gzip stream, an I/O error).
    """
    seen_ids: set[int] = set()
    for number, (raw, too_long) in enumerate(_lines_of(path, limit), 1):
        if too_long:
            yield LineResult(
                number, raw, reason=LINE_TOO_LONG, detail=f"line {number}: longer than {MAX_LINE_BYTES} bytes"
            )
            continue
        yield _check_duplicate(parse_line(raw, number, lang), seen_ids)


def _lines_of(path: str | Path, limit: int) -> Iterator[tuple[bytes, bool]]:
    """Yield the first ``limit`` lines (all when 0) as :func:`_read_lines` does, turning read errors into SourceError."""
    number = 0
    with open_source(path) as stream:
        lines = _read_lines(stream)
        while not limit or number < limit:
            try:
                line = next(lines)
            except StopIteration:
                return
            except (OSError, EOFError, zlib.error) as exc:
                raise SourceError(
                    f"{path}: unreadable after line {number} ({type(exc).__name__}: {exc}); the file is "
                    "truncated or corrupt, so download it again (or `dvc pull` it) and rerun."
                ) from exc
            number += 1
            yield line


def _check_duplicate(result: LineResult, seen_ids: set[int]) -> LineResult:
    if result.record is None:
        return result
    # 8 bytes of BLAKE2b: a false duplicate among 10**6 ids has a
    # probability of about 3e-8.
    key = int.from_bytes(hashlib.blake2b(result.record.img_id.encode(), digest_size=8).digest(), "big")
    if key not in seen_ids:
        seen_ids.add(key)
        return result
    return LineResult(
        result.line,
        result.raw,
        reason=DUPLICATE_ID,
        detail=f"line {result.line}: img_id {result.record.img_id} appeared on an earlier line",
        img_id=result.img_id,
        image_path=result.image_path,
    )


# --------------------------------------------------------------------------- parsing


def parse_line(raw: bytes, number: int, lang: str) -> LineResult:
    """Parse one line (without its newline) into a record or a drop reason; duplicates are not checked here."""
    if raw.startswith(_BOM):
        raw_text = raw[len(_BOM):]
    else:
        raw_text = raw
    if not raw_text.strip():
        return LineResult(number, raw, reason=BLANK_LINE, detail=f"line {number}: blank")

    try:
        text = raw_text.decode("utf-8")
    except UnicodeDecodeError as exc:
        return LineResult(
            number, raw, reason=INVALID_JSON,
            detail=f"line {number}: not valid UTF-8 at byte {exc.start}",
        )
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        return LineResult(number, raw, reason=INVALID_JSON, detail=f"line {number}: {exc.msg} at column {exc.colno}")
    except _DuplicateKeyError as exc:
        return LineResult(number, raw, reason=INVALID_JSON, detail=f"line {number}: duplicate key {exc.key}")
    except RecursionError:
        return LineResult(number, raw, reason=INVALID_JSON, detail=f"line {number}: nested too deeply to parse")

    if not isinstance(value, dict):
        return LineResult(
            number, raw, reason=NOT_AN_OBJECT,
            detail=f"line {number}: a JSON {type(value).__name__}, expected an object",
        )

    # A lone surrogate can only come from a \uXXXX escape, because `text` was decoded from UTF-8.
    surrogate_at = _find_lone_surrogate(value) if "\\u" in text else None
    if surrogate_at is not None:
        return LineResult(
            number, raw, reason=INVALID_FIELD,
            detail=f"line {number}: `{surrogate_at}` contains a lone UTF-16 surrogate escape, which UTF-8 cannot encode",
        )

    img_id = value.get("img_id") if isinstance(value.get("img_id"), str) else None
    image = value.get("image")
    image_path = image.get("path") if isinstance(image, dict) and isinstance(image.get("path"), str) else None
    try:
        record = _build_record(value, lang)
    except _FieldError as exc:
        return LineResult(
            number, raw, reason=exc.reason, detail=f"line {number}: {exc.detail}",
            img_id=img_id, image_path=image_path,
        )
    return LineResult(number, raw, record=record, img_id=record.img_id, image_path=record.image_path)


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Build a JSON object, raising _DuplicateKeyError instead of letting the last duplicate key win."""
    result: dict[str, Any] = {}
    for key, item in pairs:
        if key in result:
            raise _DuplicateKeyError(ascii(key)[1:-1])
        result[key] = item
    return result


def _find_lone_surrogate(value: Any, where: str = "") -> str | None:
    """Return the path of the first string (key or value) in ``value`` that UTF-8 cannot encode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{ascii(key)[1:-1]}" if where else ascii(key)[1:-1]
            if _find_lone_surrogate(key) is not None:
                return name
            found = _find_lone_surrogate(item, name)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_lone_surrogate(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def _require(obj: dict[str, Any], key: str, kind: type, where: str) -> Any:
    name = f"{where}.{key}" if where else key
    if key not in obj or obj[key] is None:
        raise _FieldError(MISSING_FIELD, f"`{name}` is missing")
    value = obj[key]
    if not isinstance(value, kind):
        raise _FieldError(
            INVALID_FIELD,
            f"`{name}` is {_short(value)} ({type(value).__name__}); expected {kind.__name__}",
        )
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _build_record(value: dict[str, Any], lang: str) -> SiluRecord:
    img_id = _require(value, "img_id", str, "").strip()
    if not img_id:
        raise _FieldError(MISSING_FIELD, "`img_id` is empty")
    image = _require(value, "image", dict, "")
    image_path = _require(image, "path", str, "image").strip()
    if not image_path:
        raise _FieldError(MISSING_FIELD, "`image.path` is empty")
    captions = _require(value, "captions", dict, "")
    content = _require(captions, "content", str, "captions")
    caption_lang = _require(captions, "lang", str, "captions").strip()

    if is_blank_caption(content):
        raise _FieldError(BLANK_CAPTION, f"`captions.content` is {_short(content)}: no text after removing markup")
    if caption_lang.lower() != lang.lower():
        raise _FieldError(WRONG_LANGUAGE, f"`captions.lang` is {caption_lang!r}; `data.lang` is {lang!r}")

    return SiluRecord(
        img_id=img_id,
        image_path=image_path,
        caption=content.strip(),
        lang=caption_lang.lower(),
        resolution=_resolution(image.get("resolution")),
        size_kib=_number(image.get("size")),
        image_format=image.get("format") if isinstance(image.get("format"), str) else None,
        categories=_categories(value.get("labels")),
    )


def is_blank_caption(text: str) -> bool:
    """Return True when ``text`` has no visible characters once HTML tags and entities are removed."""
    visible = html.unescape(_TAG.sub(" ", text)).translate(_INVISIBLE)
    return not visible.strip()


# Optional metadata: an ill-typed value becomes None or empty instead of
# dropping the record, because later stages measure the image themselves.


def _resolution(value: Any) -> tuple[int, int] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (value[0], value[1])
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _categories(labels: Any) -> dict[str, list[str]]:
    cates = labels.get("pjwk_cates") if isinstance(labels, dict) else None
    result: dict[str, list[str]] = {"level1": [], "level2": []}
    if isinstance(cates, dict):
        for level in result:
            names = cates.get(level)
            if isinstance(names, list):
                result[level] = [name for name in names if isinstance(name, str)]
    return result


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m stages.records SOURCE.jsonl[.gz] [LANG]  (prints kept and dropped counts)")
        return 0 if argv else 2
    lang = argv[1] if len(argv) > 1 else "ko"
    counts: Counter[str] = Counter()
    for result in iter_lines(argv[0], lang):
        counts["kept" if result.ok else result.reason or "?"] += 1
        if not result.ok:
            print(result.detail, file=sys.stderr)
    print(json.dumps(dict(counts), ensure_ascii=False, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
