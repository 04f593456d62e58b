"""Parquet part files, manifests and ``dataset_info.json`` entries shared by the filter, convert and split stages.

Rows are written in small row groups as they arrive, so a stage's memory
does not grow with its output, and the same rows in the same order give
byte-identical files (for one pyarrow version). A failed write (a full disk,
a file size limit) raises StageError naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stages.common import StageError, output_write_failed

# Rows per parquet row group: a few MB of JPEG bytes, read back one at a time.
ROWS_PER_ROW_GROUP = 64


class PartWriter:
    """Write one parquet file; the file is created on first use or on :meth:`close`."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self.closed = False

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= ROWS_PER_ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        try:
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.path, self.schema)
            if self.rows:
                self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
                self.rows = []
        except OSError as exc:
            raise output_write_failed(self.path, exc) from exc

    def close(self) -> None:
        """Write what is buffered and close; a part with no rows is still written, with the schema."""
        if self.closed:
            return
        self.flush()
        try:
            self.writer.close()
        except OSError as exc:
            raise output_write_failed(self.path, exc) from exc
        self.closed = True


class RotatingPartWriter:
    """Write ``part-NNNNN.parquet`` files into ``folder``, starting a new one every ``rows_per_part`` rows.

    No file is written when no row is added.
    """

    def __init__(self, folder: Path, schema: pa.Schema, rows_per_part: int):
        self.folder = folder
        self.schema = schema
        self.rows_per_part = rows_per_part
        self.parts = 0
        self.count = 0
        self.current: PartWriter | None = None

    def add(self, row: dict[str, Any]) -> None:
        if self.current is None or self.current.count >= self.rows_per_part:
            self.close()
            self.folder.mkdir(parents=True, exist_ok=True)
            self.current = PartWriter(self.folder / f"part-{self.parts:05d}.parquet", self.schema)
            self.parts += 1
        self.current.add(row)
        self.count += 1

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None


class ManifestWriter:
    """Write ``manifest.jsonl``, one JSON object per line; use it as a context manager."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = path.open("w", encoding="utf-8")
        except OSError as exc:
            raise output_write_failed(path, exc) from exc

    def write(self, entry: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise output_write_failed(self.path, exc) from exc

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            self.file.close()
        except OSError as exc:
            if kind is None:
                raise output_write_failed(self.path, exc) from exc


def list_parts(folder: Path, producer: str) -> list[Path]:
    """Return the ``part-*.parquet`` files of ``folder`` in name order; raise StageError if there are none."""
    if folder.is_file():
        raise StageError(f"{folder}: is a file, not the {producer} stage's output folder; rerun dvc repro {producer}.")
    if not folder.is_dir():
        raise StageError(f"{folder}: input folder not found; run the {producer} stage first (dvc repro {producer}).")
    parts = sorted(folder.glob("part-*.parquet"))
    if not parts:
        raise StageError(f"{folder}: no part-*.parquet found; run the {producer} stage first (dvc repro {producer}).")
    return parts


def iter_rows(parts: list[Path], columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield the rows of ``parts`` in order, one row group at a time."""
    for path in parts:
        parquet = pq.ParquetFile(path)
        missing = sorted(set(columns or []) - set(parquet.schema_arrow.names))
        if missing:
            raise StageError(f"{path}: missing columns {missing}; rerun the stage that wrote it.")
        for batch in parquet.iter_batches(batch_size=ROWS_PER_ROW_GROUP, columns=columns):
            yield from batch.to_pylist()


def dataset_entry(file_name: str) -> dict[str, Any]:
    """Return a ``dataset_info.json`` entry for ShareGPT parquet files in ``file_name``."""
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }
