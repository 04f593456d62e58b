"""Decode every downloaded image, normalise it to 8-bit RGB JPEG, and drop what training cannot use.

Run from the repository root (reads ``params.yaml``, section ``filter``)::

    python -m stages.filter data/downloaded data/filtered

Input is the download stage's output: ``shard-NNNNN.tar`` (members named by
the sha256 of the fetched bytes) and ``shard-NNNNN.jsonl`` (one line per
input record). Only records with status ``ok`` are read. Output:

- ``part-NNNNN.parquet``, one per input shard, in input order: ``line``,
  ``img_id``, ``caption``, ``lang``, ``categories`` (JSON), ``image`` (8-bit
  RGB JPEG), ``width``, ``height``, ``sha256`` (of the downloaded bytes);
- ``manifest.jsonl``: one line per ``ok`` input record (``line``,
  ``img_id``, ``status``, ``reason``, ``detail``);
- ``metrics/filter.json``: kept and dropped counts by reason.

Each image is decoded with ``load()``, so truncated files fail here and
not in the middle of training. A PNG is also checked for image data that
ends early without an error, which Pillow fills with black. A JPEG kept byte for byte is decoded at 1/8
scale, which reads and checks all its data in 40-70% of the time of a full
decode (measured with Pillow 11.3 on 20-200 KB photos). Every other image
is decoded in full, rotated by its EXIF orientation and converted to RGB.
Alpha is composited on ``filter.background``, 16-bit and float data are
rescaled to 0-255, and animated images keep their first frame.
A baseline 8-bit RGB JPEG without an orientation tag is kept byte for byte;
everything else is re-encoded at ``filter.jpeg_quality``. Exact duplicates
(same sha256) keep their first occurrence in input order.

Decoding runs in ``filter.workers`` processes, in batches of up to
BATCH_IMAGES images. Results are collected in submission order and at most
BATCHES_PER_WORKER batches per worker are in flight, so the output is the
same for any worker count and memory does not grow with the corpus.

Not covered: ICC colour profiles are not applied. Pixels stay in whatever
colour space the file uses, and re-encoded files lose the profile.
Near-duplicates, such as resized or re-encoded copies of one photo, are
not detected.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import io
import json
import os
import struct
import sys
import tarfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from stages.common import DropCounter, RateLogger, StageError, atomic_path, get_logger, write_json
from stages.config import FilterParams, ParamsError, load_params
from stages.parts import ManifestWriter, PartWriter

log = get_logger(__name__)

# Drop reasons written to the manifest and to metrics/filter.json.
EMPTY = "empty file"
NOT_IMAGE = "not an image"
TRUNCATED = "truncated"
DECODE_ERROR = "decode error"
UNSUPPORTED_MODE = "unsupported mode"
TOO_MANY_PIXELS = "too many pixels"
TOO_SMALL = "too small"
ASPECT_RATIO = "aspect ratio"
DUPLICATE = "duplicate"

SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("img_id", pa.string()),
        ("caption", pa.string()),
        ("lang", pa.string()),
        ("categories", pa.string()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
    ]
)
# Images per worker call, and bytes at most (unless one image is larger):
# enough to make the process pool's per-call cost small.
BATCH_IMAGES = 16
BATCH_BYTES = 4 * 1024 * 1024
# Batches in flight per worker process: enough to keep every worker busy
# while the main process reads the tar, few enough to keep memory flat.
BATCHES_PER_WORKER = 2

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


# --------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class ImageResult:
    """Outcome of :func:`normalise_image`: a JPEG and its size, or a drop reason."""

    sha256: str
    reason: str | None = None
    detail: str | None = None
    jpeg: bytes | None = None
    width: int = 0
    height: int = 0
    reencoded: bool = False


def normalise_image(data: bytes, params: FilterParams) -> ImageResult:
    """Decode ``data`` and return it as an 8-bit RGB JPEG, or the reason it is dropped.

    Any exception from a bad file becomes a ``decode error`` result, because
    Pillow's format plugins raise many exception types on malformed input and
    one bad image must not stop the stage. Only MemoryError propagates.
    """
    sha256 = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageResult(sha256, EMPTY)

    # Pillow warns above MAX_IMAGE_PIXELS and raises DecompressionBombError
    # (not an OSError) above twice that, for some formats already in open().
    # The header check below drops everything above max_pixels explicitly.
    Image.MAX_IMAGE_PIXELS = params.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _normalise(data, sha256, params)
    except Image.DecompressionBombError as exc:
        return ImageResult(sha256, TOO_MANY_PIXELS, str(exc))
    except UnidentifiedImageError:
        return ImageResult(sha256, NOT_IMAGE, f"content starts with {data[:32]!r}")
    except MemoryError:
        raise
    except OSError as exc:
        # Pillow reports a cut-off file as "image file is truncated" or
        # "Truncated File Read", depending on the format.
        reason = TRUNCATED if "truncated" in str(exc).lower() else DECODE_ERROR
        return ImageResult(sha256, reason, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return ImageResult(sha256, DECODE_ERROR, f"{type(exc).__name__}: {exc}")


def _normalise(data: bytes, sha256: str, params: FilterParams) -> ImageResult:
    with Image.open(io.BytesIO(data)) as image:
        # open() reads only the header, so these checks cost no decoding.
        width, height = image.size
        if width * height > params.max_pixels:
            return ImageResult(sha256, TOO_MANY_PIXELS, f"{width}x{height} > filter.max_pixels {params.max_pixels}")
        if min(width, height) < params.min_side:
            return ImageResult(sha256, TOO_SMALL, f"{width}x{height}, filter.min_side {params.min_side}")
        aspect = max(width, height) / min(width, height)
        if aspect > params.max_aspect:
            return ImageResult(sha256, ASPECT_RATIO, f"{width}x{height}, {aspect:.1f} > filter.max_aspect")

        if _is_clean_jpeg(image):
            # The file is kept as it is, so its pixels are decoded only to
            # validate them. At 1/8 scale libjpeg still entropy-decodes every
            # block, so a cut-off or unreadable scan fails as in a full decode,
            # but it skips most of the inverse DCT and the colour conversion.
            image.draft("RGB", (1, 1))
            image.load()
            return ImageResult(sha256, jpeg=data, width=width, height=height)

        # An animated image stays on its first frame, which load() decodes in full.
        image.load()
        # Inflating the data again costs about as much as the decode, so it
        # runs only when one of the last two rows is all zeros, as missing
        # rows are. Two rows, because in interlaced data the last row can
        # come from an earlier pass than the row above it.
        if image.format == "PNG" and _has_zero_row_at_bottom(image):
            missing = png_data_missing(data)
            if missing is not None:
                return ImageResult(sha256, TRUNCATED, missing)
        upright = ImageOps.exif_transpose(image)

    try:
        rgb = to_rgb(upright, params.background)
    except ValueError as exc:
        return ImageResult(sha256, UNSUPPORTED_MODE, f"mode {upright.mode}: {exc}")
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=params.jpeg_quality)
    return ImageResult(sha256, jpeg=buffer.getvalue(), width=rgb.width, height=rgb.height, reencoded=True)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
# Adam7 passes: (x start, y start, x step, y step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_missing(data: bytes) -> str | None:
    """Return a detail when a PNG's image data inflates to fewer bytes than its header needs, else None.

    Pillow 11.3 fills the missing rows with zeros, without an error, when the
    zlib stream ends cleanly but early. This inflates the IDAT chunks once
    more (no unfiltering) and counts the bytes: with zlib 1.2-1.3 that takes
    about as long as Pillow's whole decode. Malformed chunk structure is
    left to Pillow, which has already decoded the file.
    """
    position = 8
    header = None
    inflater = zlib.decompressobj()
    inflated = 0
    try:
        while position + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[position:position + 8])
            body = data[position + 8:position + 8 + length]
            position += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body[:13])
            elif kind == b"IDAT":
                chunk = body
                while chunk:
                    inflated += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
            elif kind == b"IEND":
                break
    except (struct.error, zlib.error):
        return None
    if header is None or header[3] not in _PNG_CHANNELS:
        return None
    width, height, depth, colour_type, _, _, interlace = header
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and rows:
            expected += rows * (1 + (columns * depth * _PNG_CHANNELS[colour_type] + 7) // 8)
    if inflated >= expected:
        return None
    return f"PNG image data ends after {inflated} of {expected} bytes; Pillow would fill the missing rows with zeros"


def _has_zero_row_at_bottom(image: Image.Image) -> bool:
    """Return True when one of the last two rows of ``image`` has only zero values in every band."""
    width, height = image.size
    for y in range(max(0, height - 2), height):
        extrema = image.crop((0, y, width, y + 1)).getextrema()
        bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
        if all(high == 0 for _, high in bands):
            return True
    return False


def _is_clean_jpeg(image: Image.Image) -> bool:
    """Tell from the header whether the file can be kept byte for byte: baseline 8-bit RGB JPEG, upright."""
    return (
        image.format == "JPEG"
        and image.mode == "RGB"
        and "progressive" not in image.info
        and "progression" not in image.info
        # A JPEG's EXIF block is in its header, so this reads no pixel data.
        and image.getexif().get(ExifTags.Base.Orientation) in (None, 1)
    )


def to_rgb(image: Image.Image, background: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; raise ValueError for a mode Pillow cannot convert.

    Transparent pixels are composited on ``background`` (#rrggbb) instead of
    being dropped, which would turn them black or into the hidden colour.
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = rescale_to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _hex_colour(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def rescale_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer or float grey levels to an 8-bit ``L`` image.

    Pillow's ``convert`` clips these to 0-255, so 16-bit photos turn white and
    0-1 float images black. 16-bit data is scaled from its nominal 0-65535
    range, which keeps the exposure; float data in 0-1 is scaled from 0-1.
    Other ``I`` and ``F`` data is stretched from its own minimum to maximum
    (non-finite values take the nearest end), because no nominal range exists.
    """
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    if image.mode in _SIXTEEN_BIT_MODES:
        low, high = 0.0, 65535.0
    elif finite.size == 0:
        low, high = 0.0, 1.0
    elif image.mode == "I" and finite.min() >= 0 and finite.max() <= 65535:
        low, high = 0.0, 65535.0
    elif image.mode == "F" and finite.min() >= 0 and finite.max() <= 1:
        low, high = 0.0, 1.0
    else:
        low, high = float(finite.min()), float(finite.max())

    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    span = high - low
    scaled = (values - low) * (255.0 / span) if span > 0 else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _hex_colour(value: str) -> tuple[int, int, int]:
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


# --------------------------------------------------------------------------- input shards


@dataclass
class Task:
    """One ``ok`` input record with its downloaded bytes (``None`` once its result is taken)."""

    shard: int
    record: dict[str, Any]
    data: bytes | None


def list_shards(in_dir: Path) -> list[tuple[int, Path, Path]]:
    """Return ``(index, manifest, tar)`` for every download shard, in shard order."""
    if in_dir.is_file():
        raise StageError(f"{in_dir}: is a file, not the download stage's output folder; rerun dvc repro download.")
    if not in_dir.is_dir():
        raise StageError(f"{in_dir}: input folder not found; run the download stage first (dvc repro download).")
    shards = []
    for manifest in sorted(in_dir.glob("shard-*.jsonl")):
        stem = manifest.stem
        try:
            index = int(stem.split("-", 1)[1])
        except ValueError:
            raise StageError(f"{manifest}: unexpected file name; expected shard-NNNNN.jsonl.") from None
        shards.append((index, manifest, manifest.with_suffix(".tar")))
    if not shards:
        raise StageError(f"{in_dir}: no shard-*.jsonl found; run the download stage first (dvc repro download).")
    return shards


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Read a download shard manifest; raise StageError naming the file and line on bad JSON."""
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise StageError(f"{path}:{number}: invalid JSON ({exc}); rerun the download stage.") from None
            if record.get("status") == "ok" and not record.get("member"):
                raise StageError(f"{path}:{number}: status ok but no `member`; rerun the download stage.")
            records.append(record)
    return records


def iter_tasks(shards: list[tuple[int, Path, Path]]) -> Iterator[Task]:
    """Yield every ``ok`` record with its bytes, reading one tar at a time."""
    for index, manifest, tar_path in shards:
        records = [r for r in read_manifest(manifest) if r.get("status") == "ok"]
        if not records:
            continue
        if not tar_path.is_file():
            raise StageError(f"{tar_path}: not found but {manifest} lists ok records; rerun the download stage.")
        with tarfile.open(tar_path, "r:") as tar:
            members = {member.name: member for member in tar.getmembers()}
            for record in records:
                member = members.get(record["member"])
                if member is None:
                    raise StageError(
                        f"{tar_path}: member {record['member']} of line {record.get('line')} not found; "
                        "the shard is incomplete, delete it and rerun the download stage."
                    )
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                yield Task(index, record, data)


def count_ok_records(shards: list[tuple[int, Path, Path]]) -> int:
    return sum(1 for _, manifest, _ in shards for r in read_manifest(manifest) if r.get("status") == "ok")


# --------------------------------------------------------------------------- output


def _output_row(record: dict[str, Any], result: ImageResult) -> dict[str, Any]:
    return {
        "line": record.get("line"),
        "img_id": record.get("img_id"),
        "caption": record.get("caption"),
        "lang": record.get("lang"),
        "categories": json.dumps(record.get("categories") or {}, ensure_ascii=False, sort_keys=True),
        "image": result.jpeg,
        "width": result.width,
        "height": result.height,
        "sha256": result.sha256,
    }


# --------------------------------------------------------------------------- stage


def resolve_workers(workers: int) -> int:
    """Return the process count for ``filter.workers`` (0 = the CPUs this process may use)."""
    if workers > 0:
        return workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _ordered_results(
    tasks: Iterator[Task], params: FilterParams, workers: int
) -> Iterator[tuple[Task, ImageResult]]:
    """Yield ``(task, result)`` in input order; duplicates are decided here, before decoding."""
    first_line: dict[str, Any] = {}

    def duplicate_of(task: Task) -> ImageResult | None:
        sha256 = task.record.get("sha256") or task.record["member"]
        if sha256 in first_line:
            return ImageResult(sha256, DUPLICATE, f"same bytes as line {first_line[sha256]}")
        first_line[sha256] = task.record.get("line")
        return None

    if workers == 1:
        for task in tasks:
            result = duplicate_of(task) or normalise_image(task.data or b"", params)
            task.data = None
            yield task, result
        return

    pending: collections.deque[_Batch] = collections.deque()
    batch = _Batch()
    with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
        for task in tasks:
            batch.add(task, duplicate_of(task))
            if len(batch.tasks) >= BATCH_IMAGES or batch.size >= BATCH_BYTES:
                pending.append(batch.submit(pool, params))
                batch = _Batch()
            if len(pending) >= workers * BATCHES_PER_WORKER:
                yield from _pop_batch(pending)
        if batch.tasks:
            pending.append(batch.submit(pool, params))
        while pending:
            yield from _pop_batch(pending)


def _worker_context() -> BaseContext:
    """Return the multiprocessing context for the decoding workers.

    Forking is the cheapest start, because the workers inherit every loaded
    module. It is unsafe when the caller runs other threads, because a lock
    that one of them has taken stays locked in the child. So fork is used
    only on Linux in a single-threaded caller, such as ``python -m
    stages.filter``. Otherwise a forkserver imports the decoding dependencies once and forks
    the workers from itself. Spawned workers would each import pyarrow,
    numpy and Pillow again, about 0.3 s of CPU each.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return get_context("fork")
    context = get_context("forkserver")
    # Workers run the main module's code again, as multiprocessing requires,
    # so this module is preloaded only when it is not the main module: runpy
    # warns when it runs a module that is already imported.
    preload = ["numpy", "pyarrow", "PIL.Image", "PIL.JpegImagePlugin", "PIL.PngImagePlugin", "stages.parts"]
    if __name__ != "__main__":
        preload.append(__name__)
    context.set_forkserver_preload(preload)
    return context


@dataclass
class _Batch:
    """Consecutive tasks decoded by one worker call, which saves the per-call cost of the process pool."""

    tasks: list[Task] = field(default_factory=list)
    known: list[ImageResult | None] = field(default_factory=list)  # duplicates, decided without decoding
    size: int = 0  # bytes to send to the worker
    future: Future | None = None  # results for the tasks whose ``known`` is None, in order

    def add(self, task: Task, known: ImageResult | None) -> None:
        self.tasks.append(task)
        self.known.append(known)
        if known is None:
            self.size += len(task.data or b"")

    def submit(self, pool: ProcessPoolExecutor, params: FilterParams) -> _Batch:
        images = [task.data or b"" for task, known in zip(self.tasks, self.known, strict=True) if known is None]
        if images:
            self.future = pool.submit(normalise_batch, images, params)
        return self


def normalise_batch(images: list[bytes], params: FilterParams) -> list[ImageResult]:
    """Run :func:`normalise_image` on each image, in a worker process.

    An image kept byte for byte comes back with ``jpeg=None`` and no drop
    reason: the caller still has its bytes, and sending them back through
    the pipe would cost as much as sending them out.
    """
    results = []
    for data in images:
        result = normalise_image(data, params)
        if result.reason is None and result.jpeg is data:
            result = dataclasses.replace(result, jpeg=None)
        results.append(result)
    return results


def _pop_batch(pending: collections.deque[_Batch]) -> list[tuple[Task, ImageResult]]:
    """Wait for the oldest batch and return its ``(task, result)`` pairs in input order."""
    batch = pending.popleft()
    try:
        decoded = iter(batch.future.result() if batch.future is not None else [])
    except BrokenProcessPool as exc:
        raise StageError(
            f"filter: a decoding process died at or near line {batch.tasks[0].record.get('line')} ({exc}); it was "
            "killed for memory or crashed inside an image decoder. Lower filter.workers or filter.max_pixels, and "
            "look for that record in the download manifests."
        ) from exc
    pairs = []
    for task, known in zip(batch.tasks, batch.known, strict=True):
        result = known or next(decoded)
        if result.reason is None and result.jpeg is None:
            result = dataclasses.replace(result, jpeg=task.data)
        task.data = None
        pairs.append((task, result))
    return pairs


def run_filter(in_dir: str | Path, out_dir: str | Path, params: FilterParams, metrics_path: str | Path) -> DropCounter:
    """Filter every ``ok`` record of the download shards in ``in_dir`` into ``out_dir``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    shards = list_shards(in_dir)
    total = count_ok_records(shards)
    workers = resolve_workers(params.workers)
    log.info("filter: %d ok records in %d shards, %d worker process(es)", total, len(shards), workers)

    counter = DropCounter()
    reencoded = 0
    progress = RateLogger(log, "filter", total=total)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        parts = {index: PartWriter(tmp / f"part-{index:05d}.parquet", SCHEMA) for index, _, _ in shards}
        last_shard: int | None = None
        with ManifestWriter(tmp / "manifest.jsonl") as manifest:
            for done, (task, result) in enumerate(_ordered_results(iter_tasks(shards), params, workers), 1):
                record = task.record
                if result.sha256 != (record.get("sha256") or result.sha256):
                    raise StageError(
                        f"{in_dir}: line {record.get('line')}: the tar member's sha256 is {result.sha256}, the "
                        f"manifest says {record.get('sha256')}; the shard is corrupt, delete it and rerun download."
                    )
                if task.shard != last_shard and last_shard is not None:
                    parts[last_shard].close()
                last_shard = task.shard
                if result.reason is None:
                    counter.keep()
                    reencoded += result.reencoded
                    parts[task.shard].add(_output_row(record, result))
                else:
                    counter.drop(result.reason)
                entry = {
                    "line": record.get("line"),
                    "img_id": record.get("img_id"),
                    "status": "ok" if result.reason is None else "dropped",
                    "reason": result.reason,
                    "detail": result.detail,
                }
                manifest.write(entry)
                progress.update(done, counter)
        for part in parts.values():
            part.close()
    progress.update(counter.total, counter, force=True)

    metrics = counter.metrics()
    metrics["reencoded"] = reencoded
    write_json(metrics_path, metrics)
    counter.check_error_rate(params.max_error_rate, "filter", out_dir / "manifest.jsonl")
    return counter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.filter", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="download output folder (shard-NNNNN.tar + .jsonl)")
    parser.add_argument("output", type=Path, help="folder to write part-NNNNN.parquet and manifest.jsonl to")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--metrics", default="metrics/filter.json", help="metrics file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params).filter
        run_filter(args.input, args.output, params, args.metrics)
    except (ParamsError, StageError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
