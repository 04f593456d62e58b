"""Tests for stages.records: one result per input line, with the exact drop reason."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages import records
from stages.records import LineResult, SourceError, count_lines, iter_lines, parse_line

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample" / "ko_sample.jsonl"


def make_record(img_id: str = "ab" * 32, path: str = "https://example.org/a.jpg", caption: str = "빨간 원",
                lang: str = "ko", **extra: Any) -> dict[str, Any]:
    record = {
        "img_id": img_id,
        "image": {"path": path, "resolution": [640, 480], "size": 12.5, "format": "JPEG"},
        "captions": {"content": caption, "lang": lang},
        "labels": {"pjwk_cates": {"level1": ["文化类"], "level2": ["民俗传统"]}},
    }
    record.update(extra)
    return record


def line_of(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def parse(record: Any, lang: str = "ko") -> LineResult:
    return parse_line(line_of(record), 1, lang)


def write_lines(path: Path, lines: list[bytes], newline: bytes = b"\n") -> Path:
    path.write_bytes(newline.join(lines) + newline if lines else b"")
    return path


# --------------------------------------------------------------------------- one line


def test_valid_record_fields() -> None:
    result = parse(make_record(caption="  파란 하늘 아래 빨간 원  "))
    assert result.ok
    record = result.record
    assert record is not None
    assert record.img_id == "ab" * 32
    assert record.image_path == "https://example.org/a.jpg"
    assert record.caption == "파란 하늘 아래 빨간 원"
    assert record.lang == "ko"
    assert record.resolution == (640, 480)
    assert record.size_kib == 12.5
    assert record.image_format == "JPEG"
    assert record.categories == {"level1": ["文化类"], "level2": ["民俗传统"]}


def _without(path: str) -> dict[str, Any]:
    record = make_record()
    *parents, key = path.split(".")
    node = record
    for parent in parents:
        node = node[parent]
    del node[key]
    return record


def _with(path: str, value: Any) -> dict[str, Any]:
    record = make_record()
    *parents, key = path.split(".")
    node = record
    for parent in parents:
        node = node[parent]
    node[key] = value
    return record


@pytest.mark.parametrize(
    ("record", "reason", "detail_part"),
    [
        (_without("img_id"), "missing field", "`img_id` is missing"),
        (_without("image"), "missing field", "`image` is missing"),
        (_without("image.path"), "missing field", "`image.path` is missing"),
        (_without("captions"), "missing field", "`captions` is missing"),
        (_without("captions.content"), "missing field", "`captions.content` is missing"),
        (_without("captions.lang"), "missing field", "`captions.lang` is missing"),
        (_with("img_id", None), "missing field", "`img_id` is missing"),
        (_with("img_id", "  "), "missing field", "`img_id` is empty"),
        (_with("image.path", ""), "missing field", "`image.path` is empty"),
        (_with("img_id", 12345), "invalid field", "`img_id` is 12345 (int); expected str"),
        (_with("image", "https://example.org/a.jpg"), "invalid field", "`image` is"),
        (_with("image.path", ["a.jpg"]), "invalid field", "`image.path` is"),
        (_with("captions.content", 7), "invalid field", "`captions.content` is 7"),
        (_with("captions", ["빨간 원"]), "invalid field", "`captions` is"),
        (_with("captions.content", ""), "blank caption", "no text"),
        (_with("captions.content", " \t\n "), "blank caption", "no text"),
        (_with("captions.content", "<p><br/></p>"), "blank caption", "no text"),
        (_with("captions.content", "&nbsp;<span> </span>"), "blank caption", "no text"),
        (_with("captions.content", "\u200b\ufeff"), "blank caption", "no text"),
        (_with("captions.lang", "ru"), "wrong language", "`captions.lang` is 'ru'; `data.lang` is 'ko'"),
    ],
)
def test_invalid_record_reason(record: dict[str, Any], reason: str, detail_part: str) -> None:
    result = parse_line(line_of(record), 17, "ko")
    assert not result.ok
    assert result.reason == reason
    assert result.detail is not None
    assert result.detail.startswith("line 17: ")
    assert detail_part in result.detail


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (rb'{"img_id": "\ud800", "image": {"path": "a.jpg"}, "captions": {"content": "a", "lang": "ko"}}', "img_id"),
        (rb'{"img_id": "a", "image": {"path": "\udfff.jpg"}, "captions": {"content": "a", "lang": "ko"}}',
         "image.path"),
        (rb'{"img_id": "a", "image": {"path": "a.jpg"}, "captions": {"content": "\ud800", "lang": "ko"}}',
         "captions.content"),
        (rb'{"img_id": "a", "image": {"path": "a.jpg"}, "captions": {"content": "a", "lang": "k\ud83d"}}',
         "captions.lang"),
        (rb'{"img_id": "a", "image": {"path": "a.jpg"}, "captions": {"content": "a", "lang": "ko"}, '
         rb'"labels": {"pjwk_cates": {"level1": ["\udc80"]}}}', "labels.pjwk_cates.level1[0]"),
        (rb'{"img_id": "a", "image": {"path": "a.jpg"}, "captions": {"content": "a", "lang": "ko"}, "\ud800": 1}',
         "\\ud800"),
    ],
)
def test_lone_surrogate_dropped(raw: bytes, field: str) -> None:
    result = parse_line(raw, 3, "ko")
    assert result.reason == "invalid field"
    assert result.detail == f"line 3: `{field}` contains a lone UTF-16 surrogate escape, which UTF-8 cannot encode"
    assert result.img_id is None or result.img_id.encode("utf-8")
    assert result.image_path is None or result.image_path.encode("utf-8")


def test_surrogate_pair_kept() -> None:
    raw = rb'{"img_id": "a", "image": {"path": "a.jpg"}, "captions": {"content": "\ud83d\ude00", "lang": "ko"}}'
    result = parse_line(raw, 1, "ko")
    assert result.ok
    assert result.record is not None
    assert result.record.caption == "\U0001f600"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"img_id": "a", "img_id": "b", "image": {"path": "a.jpg"}, "captions": {"content": "a", "lang": "ko"}}',
         "img_id"),
        (b'{"img_id": "a", "image": {"path": "a.jpg"}, "captions": {"content": "a", "lang": "ko", "lang": "ru"}}',
         "lang"),
    ],
)
def test_duplicate_key_dropped(raw: bytes, key: str) -> None:
    result = parse_line(raw, 4, "ko")
    assert result.reason == "invalid json"
    assert result.detail == f"line 4: duplicate key {key}"


def test_dropped_line_keeps_identity() -> None:
    result = parse(_with("captions.lang", "ru"))
    assert result.img_id == "ab" * 32
    assert result.image_path == "https://example.org/a.jpg"


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b"", "blank line", "line 5: blank"),
        (b"   \t", "blank line", "line 5: blank"),
        (b"\xef\xbb\xbf", "blank line", "line 5: blank"),
        (b'{"img_id": "ab", "image": ', "invalid json", "line 5: Expecting value at column 27"),
        (b"{'img_id': 'ab'}", "invalid json", "line 5: Expecting property name enclosed in double quotes at column 2"),
        (b'{"img_id": "\xff"}', "invalid json", "line 5: not valid UTF-8 at byte 12"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid json", "line 5: nested too deeply to parse"),
        (b"[1, 2]", "not an object", "line 5: a JSON list, expected an object"),
        (b'"text"', "not an object", "line 5: a JSON str, expected an object"),
        (b"null", "not an object", "line 5: a JSON NoneType, expected an object"),
    ],
)
def test_unparsable_line_reason(raw: bytes, reason: str, detail: str) -> None:
    result = parse_line(raw, 5, "ko")
    assert result.reason == reason
    assert result.detail == detail
    assert result.record is None


def test_markup_caption_kept_verbatim() -> None:
    caption = "<b>서울</b>의 &quot;야경&quot; 사진"
    result = parse(make_record(caption=caption))
    assert result.record is not None
    assert result.record.caption == caption


def test_language_match_ignores_case() -> None:
    assert parse(make_record(lang="KO")).ok
    assert parse(make_record(lang="ru"), lang="ru").ok


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [([640, 480], (640, 480)), ([640], None), (["640", "480"], None), ([0, 480], None), ("640x480", None),
     ([True, 480], None)],
)
def test_resolution_normalised(resolution: Any, expected: Any) -> None:
    record = make_record()
    record["image"]["resolution"] = resolution
    result = parse(record)
    assert result.record is not None
    assert result.record.resolution == expected


def test_optional_fields_tolerated() -> None:
    record = make_record()
    del record["labels"]
    record["image"] = {"path": "a.jpg", "size": "big", "format": 3}
    result = parse(record)
    assert result.record is not None
    assert result.record.size_kib is None
    assert result.record.image_format is None
    assert result.record.resolution is None
    assert result.record.categories == {"level1": [], "level2": []}


# --------------------------------------------------------------------------- files


def test_file_with_every_fault(tmp_path: Path) -> None:
    lines = [
        b"\xef\xbb\xbf" + line_of(make_record(img_id="01" * 32)),  # BOM before the first record
        b"",
        line_of(make_record(img_id="02" * 32, caption="  ")),
        b"{not json",
        line_of(make_record(img_id="01" * 32, caption="다른 설명")),  # duplicate id
        line_of(make_record(img_id="03" * 32, path="https://example.org/a.jpg")),  # duplicate URL: kept
        line_of([1, 2, 3]),
        line_of(make_record(img_id="04" * 32, lang="ru")),
        line_of(make_record(img_id="04" * 32)),  # first valid record with this id
    ]
    path = write_lines(tmp_path / "corpus.jsonl", lines, newline=b"\r\n")

    results = list(iter_lines(path, "ko"))

    assert [result.line for result in results] == list(range(1, 10))
    assert [result.reason for result in results] == [
        None, "blank line", "blank caption", "invalid json", "duplicate id", None, "not an object",
        "wrong language", None,
    ]
    assert results[0].record is not None
    assert results[0].record.img_id == "01" * 32
    assert results[4].detail == f"line 5: img_id {'01' * 32} appeared on an earlier line"
    assert results[8].record is not None
    assert results[8].record.img_id == "04" * 32
    assert count_lines(path) == 9


def test_crlf_stripped_from_caption(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "crlf.jsonl", [line_of(make_record(caption="끝"))], newline=b"\r\n")
    (result,) = list(iter_lines(path, "ko"))
    assert result.record is not None
    assert result.record.caption == "끝"
    assert result.raw.endswith(b"}")


def test_unicode_line_separator_not_split(tmp_path: Path) -> None:
    # json.dumps with ensure_ascii=False writes U+2028 raw; str.splitlines would split there.
    path = write_lines(tmp_path / "u2028.jsonl", [line_of(make_record(caption="첫 줄\u2028둘째 줄"))])
    results = list(iter_lines(path, "ko"))
    assert len(results) == 1
    assert results[0].ok


def test_gzip_source(tmp_path: Path) -> None:
    lines = [line_of(make_record(img_id=f"{i:064x}")) for i in range(5)]
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    assert [result.ok for result in iter_lines(path, "ko")] == [True] * 5
    assert count_lines(path) == 5


def test_gzip_detected_without_suffix(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(gzip.compress(line_of(make_record()) + b"\n"))
    assert [result.ok for result in iter_lines(path, "ko")] == [True]


def test_truncated_gzip_raises(tmp_path: Path) -> None:
    data = gzip.compress(b"\n".join(line_of(make_record(img_id=f"{i:064x}")) for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="cut.jsonl.gz: unreadable after line"):
        list(iter_lines(path, "ko"))


def test_limit_counts_every_line(tmp_path: Path) -> None:
    lines = [line_of(make_record(img_id=f"{i:064x}")) for i in range(10)]
    lines.insert(2, b"")
    path = write_lines(tmp_path / "corpus.jsonl", lines)
    results = list(iter_lines(path, "ko", limit=4))
    assert [result.line for result in results] == [1, 2, 3, 4]
    assert results[2].reason == "blank line"
    assert count_lines(path, limit=4) == 4
    assert count_lines(path, limit=100) == 11


def test_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(line_of(make_record(img_id="01" * 32)) + b"\n" + line_of(make_record(img_id="02" * 32)))
    assert [result.ok for result in iter_lines(path, "ko")] == [True, True]


def test_long_line_dropped_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 600)
    long_record = make_record(caption="가" * 400)
    path = write_lines(tmp_path / "long.jsonl", [line_of(make_record(img_id="01" * 32)), line_of(long_record),
                                                 line_of(make_record(img_id="02" * 32))])
    results = list(iter_lines(path, "ko"))
    assert [result.reason for result in results] == [None, "line too long", None]
    assert results[1].detail == "line 2: longer than 600 bytes"
    assert len(results[1].raw) <= 600


def test_sample_file_outcomes() -> None:
    counts = Counter(result.reason or "kept" for result in iter_lines(SAMPLE, "ko"))
    # The missing image file is kept here; the download stage drops it.
    assert counts == {"kept": 39, "blank line": 1, "invalid json": 1, "wrong language": 1}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=40).filter(lambda raw: b"\n" not in raw),
    st.builds(lambda i, caption, lang: line_of(make_record(img_id=f"{i:064x}", caption=caption, lang=lang)),
              st.integers(0, 5), st.text(max_size=10), st.sampled_from(["ko", "ru"])),
), max_size=30))
def test_every_line_accounted(tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]) -> None:
    path = tmp_path_factory.mktemp("lines") / "corpus.jsonl"
    write_lines(path, lines)
    results = list(iter_lines(path, "ko"))
    assert [result.line for result in results] == list(range(1, len(lines) + 1))
    for result in results:
        assert result.ok != (result.reason is not None)
        assert result.reason is None or result.reason in records.DROP_REASONS
