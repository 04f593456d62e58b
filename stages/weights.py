"""Check safetensors weights and their shard index without loading any tensor.

A truncated copy or an index that names a missing shard otherwise passes the
stages that only copy files. The base model would then fail at train, and
the board export on the board after the whole upload. The checks read only the file headers, so they cost milliseconds even for
gigabytes of weights.

The file layout follows the safetensors format: an 8-byte little-endian
header length N, N bytes of JSON mapping each tensor name to its
``data_offsets`` ``[begin, end]`` (relative to the end of the header), then
the data section, which must end exactly at the end of the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from stages.common import StageError

INDEX_NAME = "model.safetensors.index.json"
# Bounds the header read, so a garbage length is rejected rather than read; real headers are a few MB.
MAX_HEADER_BYTES = 100_000_000


def safetensors_tensor_names(path: Path, fix: str) -> set[str]:
    """Validate one safetensors file's header against its size; return its tensor names.

    Raises :class:`StageError` naming ``path`` and ending with ``fix`` when the
    header is truncated or invalid, a tensor's data lies outside the file, or
    the file is longer or shorter than the end of its data.
    """

    def invalid(reason: str) -> StageError:
        return StageError(f"{path}: invalid safetensors file: {reason}. {fix}")

    size = path.stat().st_size
    if size < 8:
        raise invalid(f"{size} bytes, shorter than the 8-byte header length")
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise invalid(f"header length {header_len} does not fit in the file size {size}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise invalid("header is not a JSON object")

    data_size = size - 8 - header_len
    data_end = 0
    names = set()
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(offset, int) for offset in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise invalid(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] > data_size:
            raise invalid(f"tensor {name!r} ends at byte {offsets[1]} of the data, but the data has {data_size} bytes")
        data_end = max(data_end, offsets[1])
        names.add(name)
    if data_end != data_size:
        raise invalid(f"the data has {data_size} bytes, but the tensors end at byte {data_end}")
    return names


def check_weights(folder: Path, fix: str) -> None:
    """Validate every ``*.safetensors`` file in ``folder`` and, when present, its shard index.

    The index must name only shards that exist in ``folder``, and each tensor
    it maps must be in the shard it names. Every error names the file and ends
    with ``fix``.
    """
    names_by_shard = {path.name: safetensors_tensor_names(path, fix) for path in sorted(folder.glob("*.safetensors"))}
    index = folder / INDEX_NAME
    if not index.exists():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(f"{index}: invalid shard index ({type(exc).__name__}: {exc}). {fix}") from None
    if not isinstance(weight_map, dict):
        raise StageError(f"{index}: invalid shard index: weight_map is not a JSON object. {fix}")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in names_by_shard:
            raise StageError(f"{index}: tensor {tensor!r} is mapped to {folder / str(shard)}, which is not found. {fix}")
        if tensor not in names_by_shard[shard]:
            raise StageError(f"{index}: tensor {tensor!r} is mapped to {folder / shard}, which does not contain it. {fix}")
