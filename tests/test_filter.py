"""Tests for stages.filter on a generated corpus of good, odd and broken images.

The download shards are built here in the documented layout (tar members
named by sha256, one manifest line per record), so these tests do not
depend on the download stage.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import tarfile
import threading
import zlib
from collections import deque
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages import download
from stages.common import StageError
from stages.config import FilterParams, parse_params
from stages.filter import Task, _Batch, _pop_batch, main, normalise_image, rescale_to_8bit, run_filter, to_rgb
from tests.file_limit import run_with_file_size_limit

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


# --------------------------------------------------------------------------- corpus


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def two_colour(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """Return an image whose left half is ``left`` and right half ``right``."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_declaring(width: int, height: int) -> bytes:
    """Return a valid-looking PNG of a few bytes whose header declares ``width`` x ``height``."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b""
    )


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency() -> bytes:
    image = two_colour((40, 40), RED, GREEN).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent = image.getpixel((0, 0))
    return encode(image, "PNG", transparency=transparent)


def rgba_half_transparent() -> bytes:
    image = Image.new("RGBA", (40, 40), (0, 0, 255, 0))
    image.paste((255, 0, 0, 128), (20, 0, 40, 40))
    return encode(image, "PNG")


def sixteen_bit_png() -> bytes:
    # Left half 1/4 of full scale, right half full scale; Pillow's convert
    # would clip both to 255.
    values = np.full((40, 40), 16384, dtype=np.uint16)
    values[:, 20:] = 65535
    return encode(Image.fromarray(values), "PNG")


def float_tiff(low: float, high: float) -> bytes:
    values = np.full((40, 40), low, dtype=np.float32)
    values[:, 20:] = high
    return encode(Image.fromarray(values), "TIFF")


CLEAN_JPEG = encode(two_colour((64, 48), RED, BLUE), "JPEG", quality=90)
TRUNCATED_JPEG = encode(Image.effect_noise((200, 200), 60).convert("RGB"), "JPEG", quality=90)
TRUNCATED_JPEG = TRUNCATED_JPEG[: len(TRUNCATED_JPEG) // 2]
UPRIGHT_TAGGED = jpeg_with_orientation(Image.new("RGB", (50, 40), RED), 1)
# Orientation 6: the stored 60x40 image (red left, blue right) is displayed
# rotated 90 degrees clockwise, as 40x60 with red on top.
ROTATED = jpeg_with_orientation(two_colour((60, 40), RED, BLUE), 6)


# One row per case: name, bytes, expected reason (None = kept), expected
# output size, and (x, y, colour) pixels to check in the output.
CASES: list[tuple[str, bytes, str | None, tuple[int, int] | None, list]] = [
    ("clean jpeg", CLEAN_JPEG, None, (64, 48), [(5, 24, RED), (58, 24, BLUE)]),
    ("upright tagged jpeg", UPRIGHT_TAGGED, None, (50, 40), [(25, 20, RED)]),
    ("progressive jpeg", encode(Image.new("RGB", (40, 40), GREEN), "JPEG", progressive=True), None, (40, 40),
     [(20, 20, GREEN)]),
    ("truncated jpeg", TRUNCATED_JPEG, "truncated", None, []),
    ("empty file", b"", "empty file", None, []),
    ("html as jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not an image", None, []),
    ("cmyk jpeg", encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), None, (40, 40),
     [(20, 20, RED)]),
    ("grayscale png", encode(Image.new("L", (40, 40), 100), "PNG"), None, (40, 40), [(20, 20, (100, 100, 100))]),
    ("palette png", encode(two_colour((40, 40), RED, GREEN).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
     None, (40, 40), [(5, 20, RED), (35, 20, GREEN)]),
    ("palette transparency", palette_with_transparency(), None, (40, 40), [(5, 20, WHITE), (35, 20, GREEN)]),
    ("rgba transparent", rgba_half_transparent(), None, (40, 40), [(5, 20, WHITE), (35, 20, (255, 127, 127))]),
    ("la png", encode(Image.new("LA", (40, 40), (0, 0)), "PNG"), None, (40, 40), [(20, 20, WHITE)]),
    ("bilevel png", encode(Image.new("1", (40, 40), 1), "PNG"), None, (40, 40), [(20, 20, WHITE)]),
    ("16-bit png", sixteen_bit_png(), None, (40, 40), [(5, 20, (64, 64, 64)), (35, 20, WHITE)]),
    ("float tiff 0-1", float_tiff(0.0, 1.0), None, (40, 40), [(5, 20, (0, 0, 0)), (35, 20, WHITE)]),
    ("float tiff wide range", float_tiff(-5.0, 1000.0), None, (40, 40), [(5, 20, (0, 0, 0)), (35, 20, WHITE)]),
    ("animated gif", animated_gif(), None, (40, 40), [(20, 20, RED)]),
    ("exif rotated", ROTATED, None, (40, 60), [(20, 5, RED), (20, 55, BLUE)]),
    ("1x1", encode(Image.new("RGB", (1, 1), RED), "PNG"), "too small", None, []),
    ("extreme aspect", encode(Image.new("RGB", (30, 1000), RED), "PNG"), "aspect ratio", None, []),
    ("bomb over twice limit", png_declaring(100_000, 100_000), "too many pixels", None, []),
    ("bomb over limit", png_declaring(7_000, 7_000), "too many pixels", None, []),
    ("duplicate of clean jpeg", CLEAN_JPEG, "duplicate", None, []),
]


# --------------------------------------------------------------------------- shard fixture


def download_record(line: int, data: bytes | None, caption: str = "") -> dict[str, Any]:
    """Return a download manifest line; ``data=None`` makes a record the download dropped."""
    record: dict[str, Any] = {
        "line": line,
        "img_id": f"id{line:04d}",
        "url": f"https://example.test/{line}.jpg",
        "caption": caption or f"캡션 {line}",
        "lang": "ko",
        "resolution": [64, 48],
        "categories": {"level1": ["文化类"], "level2": ["民俗传统"]},
    }
    if data is None:
        record.update(status="dropped", reason="http 404", detail="404 Not Found", member=None, sha256=None)
        return record
    digest = hashlib.sha256(data).hexdigest()
    record.update(
        status="ok", reason=None, detail=None, member=digest, sha256=digest, bytes=len(data),
        content_type="image/jpeg",
    )
    return record


def write_shard(folder: Path, index: int, records: list[tuple[dict[str, Any], bytes | None]]) -> None:
    """Write ``shard-NNNNN.tar`` and ``shard-NNNNN.jsonl`` as the download stage does."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"shard-{index:05d}.jsonl").open("w", encoding="utf-8") as manifest:
        for record, _ in records:
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
    with tarfile.open(folder / f"shard-{index:05d}.tar", "w") as tar:
        added = set()
        for record, data in records:
            if data is None or record["member"] in added:
                continue
            added.add(record["member"])
            info = tarfile.TarInfo(record["member"])
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_corpus(folder: Path) -> None:
    """Write :data:`CASES` as two shards, with one download-dropped record in between."""
    records = [(download_record(line, data), data) for line, (_, data, *_) in enumerate(CASES, 1)]
    dropped = download_record(len(CASES) + 1, None)
    write_shard(folder, 0, records[:10] + [(dropped, None)])
    write_shard(folder, 1, records[10:])


def read_parts(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for part in sorted(folder.glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


def read_manifest(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


PARAMS = FilterParams(workers=1)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("filter")
    write_corpus(root / "downloaded")
    run_filter(root / "downloaded", root / "filtered", PARAMS, root / "metrics.json")
    return {
        "root": root,
        "rows": {row["line"]: row for row in read_parts(root / "filtered")},
        "manifest": {entry["line"]: entry for entry in read_manifest(root / "filtered")},
        "metrics": json.loads((root / "metrics.json").read_text()),
    }


# --------------------------------------------------------------------------- per-case outcome


@pytest.mark.parametrize("line,case", list(enumerate(CASES, 1)), ids=[case[0] for case in CASES])
def test_filter_case(filtered: dict[str, Any], line: int, case: tuple) -> None:
    name, data, reason, size, pixels = case
    entry = filtered["manifest"][line]
    assert entry["reason"] == reason, entry["detail"]
    assert entry["status"] == ("ok" if reason is None else "dropped")
    if reason is not None:
        assert line not in filtered["rows"]
        return

    row = filtered["rows"][line]
    image = Image.open(io.BytesIO(row["image"]))
    assert image.format == "JPEG"
    assert image.mode == "RGB"
    assert image.size == size
    assert (row["width"], row["height"]) == size
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    for x, y, colour in pixels:
        actual = image.getpixel((x, y))
        assert max(abs(a - b) for a, b in zip(actual, colour, strict=True)) <= 12, f"{name} pixel {x},{y}: {actual} != {colour}"


def test_clean_jpeg_kept_byte_for_byte(filtered: dict[str, Any]) -> None:
    assert filtered["rows"][1]["image"] == CLEAN_JPEG
    assert filtered["rows"][2]["image"] == UPRIGHT_TAGGED


def test_reencoded_jpeg_is_baseline(filtered: dict[str, Any]) -> None:
    image = Image.open(io.BytesIO(filtered["rows"][3]["image"]))
    assert "progressive" not in image.info


def test_drop_details_name_values(filtered: dict[str, Any]) -> None:
    by_name = {case[0]: filtered["manifest"][line] for line, case in enumerate(CASES, 1)}
    assert by_name["duplicate of clean jpeg"]["detail"] == "same bytes as line 1"
    assert by_name["1x1"]["detail"] == "1x1, filter.min_side 28"
    assert by_name["bomb over limit"]["detail"] == "7000x7000 > filter.max_pixels 40000000"
    assert "exceeds limit" in by_name["bomb over twice limit"]["detail"]
    assert by_name["html as jpg"]["detail"].startswith("content starts with b'<!DOCTYPE html>")


def test_output_columns_and_order(filtered: dict[str, Any]) -> None:
    table = pq.read_table(filtered["root"] / "filtered" / "part-00000.parquet")
    assert table.column_names == [
        "line", "img_id", "caption", "lang", "categories", "image", "width", "height", "sha256",
    ]
    assert str(table.schema.field("line").type) == "int64"
    assert str(table.schema.field("width").type) == "int32"
    row = table.to_pylist()[0]
    assert row["img_id"] == "id0001"
    assert row["caption"] == "캡션 1"
    assert row["lang"] == "ko"
    assert json.loads(row["categories"]) == {"level1": ["文化类"], "level2": ["民俗传统"]}
    lines = [row["line"] for row in read_parts(filtered["root"] / "filtered")]
    assert lines == sorted(lines)


def test_manifest_skips_download_drops(filtered: dict[str, Any]) -> None:
    assert sorted(filtered["manifest"]) == list(range(1, len(CASES) + 1))
    assert list(filtered["manifest"][1]) == ["line", "img_id", "status", "reason", "detail"]


def test_metrics_add_up(filtered: dict[str, Any]) -> None:
    metrics = filtered["metrics"]
    expected_drops: dict[str, int] = {}
    for _, _, reason, _, _ in CASES:
        if reason is not None:
            expected_drops[reason] = expected_drops.get(reason, 0) + 1
    assert metrics["records"] == len(CASES)
    assert metrics["kept"] == len(filtered["rows"])
    assert metrics["dropped"] == sum(expected_drops.values())
    assert metrics["kept"] + metrics["dropped"] == metrics["records"]
    assert metrics["dropped_by_reason"] == dict(sorted(expected_drops.items()))
    # Everything kept except the two JPEGs passed through was re-encoded.
    assert metrics["reencoded"] == metrics["kept"] - 2


# --------------------------------------------------------------------------- determinism and errors


def test_worker_count_same_output(filtered: dict[str, Any], tmp_path: Path) -> None:
    run_filter(filtered["root"] / "downloaded", tmp_path / "out", FilterParams(workers=2), tmp_path / "m.json")
    for name in ("part-00000.parquet", "part-00001.parquet", "manifest.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (filtered["root"] / "filtered" / name).read_bytes(), name


def test_workers_beside_thread_same_output(filtered: dict[str, Any], tmp_path: Path) -> None:
    # With another thread running, the workers start from a forkserver instead of a fork.
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        run_filter(filtered["root"] / "downloaded", tmp_path / "out", FilterParams(workers=2), tmp_path / "m.json")
    finally:
        stop.set()
        thread.join()
    for name in ("part-00000.parquet", "part-00001.parquet", "manifest.jsonl"):
        assert (tmp_path / "out" / name).read_bytes() == (filtered["root"] / "filtered" / name).read_bytes(), name


def test_empty_shard_writes_empty_part(tmp_path: Path) -> None:
    write_shard(tmp_path / "in", 0, [(download_record(1, None), None)])
    write_shard(tmp_path / "in", 1, [(download_record(2, CLEAN_JPEG), CLEAN_JPEG)])
    counter = run_filter(tmp_path / "in", tmp_path / "out", PARAMS, tmp_path / "m.json")
    assert counter.kept == 1
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "out" / "part-00001.parquet").num_rows == 1


def test_missing_input_names_stage(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="run the download stage first"):
        run_filter(tmp_path / "nothing", tmp_path / "out", PARAMS, tmp_path / "m.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StageError, match="no shard-"):
        run_filter(tmp_path / "empty", tmp_path / "out", PARAMS, tmp_path / "m.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(StageError, match="file: is a file, not the download stage's output folder"):
        run_filter(tmp_path / "file", tmp_path / "out", PARAMS, tmp_path / "m.json")


def test_missing_tar_member_raises(tmp_path: Path) -> None:
    record = download_record(1, CLEAN_JPEG)
    write_shard(tmp_path / "in", 0, [(record, None)])
    with pytest.raises(StageError, match=f"member {record['member']} of line 1 not found"):
        run_filter(tmp_path / "in", tmp_path / "out", PARAMS, tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_corrupt_member_raises(tmp_path: Path) -> None:
    record = download_record(1, CLEAN_JPEG)
    write_shard(tmp_path / "in", 0, [(record, CLEAN_JPEG[:-1] + b"\0")])
    with pytest.raises(StageError, match="shard is corrupt"):
        run_filter(tmp_path / "in", tmp_path / "out", PARAMS, tmp_path / "m.json")


def test_invalid_manifest_line_raises(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "shard-00000.jsonl").write_text('{"line": 1, "status": "ok"\n')
    with pytest.raises(StageError, match=r"shard-00000.jsonl:1: invalid JSON"):
        run_filter(tmp_path / "in", tmp_path / "out", PARAMS, tmp_path / "m.json")


def test_main_fails_over_error_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_shard(tmp_path / "in", 0, [(download_record(1, b""), b""), (download_record(2, CLEAN_JPEG), CLEAN_JPEG)])
    (tmp_path / "params.yaml").write_text("filter:\n  workers: 1\n  max_error_rate: 0.4\n")
    monkeypatch.chdir(tmp_path)
    assert main(["in", "out"]) == 1
    # The outputs stay for inspection; DVC does not record a failed stage.
    assert json.loads((tmp_path / "metrics" / "filter.json").read_text())["dropped_by_reason"] == {"empty file": 1}
    (tmp_path / "params.yaml").write_text("filter:\n  workers: 1\n  max_error_rate: 0.5\n")
    assert main(["in", "out"]) == 0


def test_sample_drops_as_documented(tmp_path: Path) -> None:
    sample = Path(__file__).resolve().parent.parent / "data" / "sample"
    params = parse_params({"data": {"source": str(sample / "ko_sample.jsonl"), "image_root": str(sample / "images")}})
    download.run(sample / "ko_sample.jsonl", tmp_path / "downloaded", params, tmp_path / "download.json")

    run_filter(tmp_path / "downloaded", tmp_path / "filtered", PARAMS, tmp_path / "filter.json")

    # The lines of the table "The embedded sample" in docs/data.md.
    dropped = {entry["line"]: entry["reason"] for entry in read_manifest(tmp_path / "filtered") if entry["reason"]}
    assert dropped == {4: "truncated", 15: "too small", 24: "aspect ratio", 29: "duplicate"}


def png_from_stream(width: int, height: int, stream: bytes, colour_type: int = 2, interlace: int = 0) -> bytes:
    """Return an 8-bit PNG whose IDAT is ``stream`` (filter bytes and pixels) compressed as one zlib stream."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(stream)) + chunk(
        b"IEND", b""
    )


def rows_of(columns: int, rows: int, channels: int = 3) -> bytes:
    """Return ``rows`` unfiltered rows of grey pixels, each with its filter byte."""
    return (b"\0" + bytes([90]) * (columns * channels)) * rows


def test_png_short_image_data_truncated() -> None:
    # The zlib stream ends cleanly after 50 of 100 rows; Pillow alone fills the rest with black.
    result = normalise_image(png_from_stream(100, 100, rows_of(100, 50)), PARAMS)
    assert result.reason == "truncated"
    assert result.detail == "PNG image data ends after 15050 of 30100 bytes; Pillow would fill the missing rows with zeros"


def test_png_complete_image_data_kept() -> None:
    assert normalise_image(png_from_stream(100, 100, rows_of(100, 100)), PARAMS).reason is None
    black = (b"\0" + bytes(300)) * 100  # zero rows at the bottom, as missing rows would be, but complete
    assert normalise_image(png_from_stream(100, 100, black), PARAMS).reason is None
    assert normalise_image(png_from_stream(40, 30, rows_of(40, 30, 2), colour_type=4), PARAMS).reason is None
    for image in (Image.new("P", (50, 40)), Image.new("1", (50, 40)), Image.new("I;16", (50, 40)),
                  Image.new("RGBA", (50, 40)), Image.new("LA", (50, 40))):
        assert normalise_image(encode(image, "PNG"), PARAMS).reason is None, image.mode


def test_png_interlaced_rows_counted() -> None:
    # The 7 Adam7 passes of a 32x32 image, as (columns, rows).
    passes = [(4, 4), (4, 4), (8, 4), (8, 8), (16, 8), (16, 16), (32, 16)]
    stream = b"".join(rows_of(columns, rows) for columns, rows in passes)
    assert normalise_image(png_from_stream(32, 32, stream, interlace=1), PARAMS).reason is None
    short = png_from_stream(32, 32, stream[: -len(rows_of(32, 2))], interlace=1)
    assert normalise_image(short, PARAMS).reason == "truncated"


def test_failed_write_names_part(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [encode(Image.fromarray(rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)), "PNG") for _ in range(8)]
    write_shard(tmp_path / "in", 0, [(download_record(line, data), data) for line, data in enumerate(images, 1)])
    (tmp_path / "params.yaml").write_text("filter:\n  workers: 1\n")

    # Each re-encoded noise image is about 20 KB, so the part file passes 64 KB.
    result = run_with_file_size_limit(["-m", "stages.filter", "in", "out"], tmp_path, 64 * 1024)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot write out/part-00000.parquet: File too large; the file size limit was reached" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in", "params.yaml"]


# --------------------------------------------------------------------------- helpers


def test_rescale_16_bit_uses_nominal_range() -> None:
    image = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    assert list(rescale_to_8bit(image).getdata()) == [0, 1, 128, 255]


def test_rescale_float_stretches_data_range() -> None:
    image = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], dtype=np.float32))
    assert list(rescale_to_8bit(image).getdata()) == [0, 128, 255, 0]


def test_rescale_constant_float_is_black() -> None:
    image = Image.fromarray(np.full((2, 2), 7.0, dtype=np.float32))
    assert list(rescale_to_8bit(image).getdata()) == [0, 0, 0, 0]


def test_rescale_32_bit_int_beyond_16_bit() -> None:
    image = Image.fromarray(np.array([[-100, 100_000]], dtype=np.int32))
    assert list(rescale_to_8bit(image).getdata()) == [0, 255]


def test_to_rgb_composites_on_background() -> None:
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(image, "#102030").getpixel((0, 0)) == (16, 32, 48)


def test_dead_worker_raises_stage_error() -> None:
    future: Future = Future()
    future.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    pending = deque([_Batch(tasks=[Task(0, {"line": 7}, None)], known=[None], future=future)])
    with pytest.raises(StageError, match="a decoding process died at or near line 7"):
        _pop_batch(pending)


def full_decode_reason(data: bytes) -> str | None:
    """Return the drop reason a full ``load()`` of ``data`` gives, or None when it decodes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except OSError as exc:
        return "truncated" if "truncated" in str(exc).lower() else "decode error"
    return None


def test_clean_jpeg_corruption_like_full_decode() -> None:
    # A kept-as-is JPEG is validated at 1/8 scale: every corruption of its
    # scan data must get the same outcome as a full decode.
    source = encode(Image.effect_noise((160, 120), 50).convert("RGB"), "JPEG", quality=90)
    scan = source.index(b"\xff\xda") + 20  # past the start-of-scan header
    rng = random.Random(0)
    outcomes = set()
    for trial in range(300):
        data = bytearray(source)
        if trial % 3 == 0:
            data = data[: rng.randrange(scan, len(data))]
        elif trial % 3 == 1:
            for _ in range(rng.randrange(1, 30)):
                data[rng.randrange(scan, len(data) - 2)] ^= 1 << rng.randrange(8)
        else:
            start = rng.randrange(scan, len(data) - 2)
            length = min(rng.randrange(1, 400), len(data) - start)
            data[start : start + length] = rng.randbytes(length)
        expected = full_decode_reason(bytes(data))
        outcomes.add(expected)
        assert normalise_image(bytes(data), PARAMS).reason == expected, f"trial {trial}"
    # The trials must include both corruptions that decode and ones that fail.
    assert None in outcomes
    assert "truncated" in outcomes

