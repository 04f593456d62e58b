"""Rewrite the merged Qwen2-VL checkpoint so MindNLP 0.4.1 on the board loads it.

Run::

    python -m stages.board_export models/merged models/board

The merged export is written by transformers 5.x (through LLaMA-Factory),
whose file formats MindNLP 0.4.1 (built against transformers 4.4x and
tokenizers 0.19.1) misreads or rejects. The output folder is a copy with
these fixes; the input folder is never changed:

1. ``tokenizer.json``: BPE merges written as ``["a", "b"]`` pairs become
   ``"a b"`` strings, the only form tokenizers 0.19.1 parses.
2. ``config.json``: the text settings nested under ``text_config`` move to the
   top level, and ``rope_parameters`` becomes ``rope_theta`` plus
   ``rope_scaling: {type: mrope, mrope_section}``. Unpatched, MindNLP 0.4.1
   finds no ``hidden_size`` at the top and silently builds a model of its
   default (72B) sizes.
3. ``preprocessor_config.json``: written from ``processor_config.json``'s
   ``image_processor`` when missing, with ``min_pixels``/``max_pixels`` taken
   from ``size.shortest_edge``/``size.longest_edge`` (transformers 5.x stores
   the pixel limits there; MindNLP reads only the two keys).
4. ``processor_config.json`` is dropped: its nested ``image_processor`` and
   ``video_processor`` make MindNLP's ``Qwen2VLProcessor.from_pretrained``
   fail with "got multiple values for argument 'image_processor'".
5. ``chat_template.json`` is written from ``chat_template.jinja`` (or the
   tokenizer config's template); MindNLP 0.4.1 reads only the JSON file.
6. ``tokenizer_config.json``: a list-valued ``extra_special_tokens`` (the
   transformers 5.x name) becomes ``additional_special_tokens``.
7. Safetensors weights named ``model.language_model.*`` / ``model.visual.*``
   (the transformers >= 4.52 module layout) are renamed to ``model.*`` /
   ``visual.*`` by rewriting only the file header; files already in the old
   layout are copied unchanged.

Before copying, every safetensors file and the shard index are checked
(:mod:`stages.weights`), so a truncated or missing shard fails here, not on
the board after the upload. A checkpoint already in the old formats passes
through unchanged. The stage then checks the output (sizes in ``config.json`` equal the input's text
settings, merges are strings, pixel limits present) and records what it
changed in ``models/board/board_export.json``. Loading the result with
MindNLP itself happens in the tests (``tests/test_board_export.py``), which
compare its greedy tokens with transformers on the tiny model.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from stages.common import StageError, atomic_path, get_logger
from stages.config import ParamsError, load_params
from stages.weights import INDEX_NAME, check_weights

log = get_logger(__name__)

REPORT_NAME = "board_export.json"
# Qwen2-VL image processor defaults (transformers 4.45, MindNLP 0.4.1).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
WEIGHT_RENAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
COPY_CHUNK = 16 << 20
REMERGE_FIX = "Rebuild the merged weights with `dvc repro -f merge`."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path}: cannot read JSON ({exc}); is the merged export complete?") from None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- fixes


def fix_tokenizer(path: Path) -> list[str]:
    """Write BPE merges as ``"a b"`` strings; return the changes made."""
    data = _read_json(path)
    merges = data.get("model", {}).get("merges")
    if not merges or all(isinstance(m, str) for m in merges):
        return []
    converted = []
    for merge in merges:
        if isinstance(merge, str):
            converted.append(merge)
            continue
        left, right = merge
        if " " in left or " " in right:
            raise StageError(
                f'{path}: merge {merge!r} contains a space, which the "a b" string form of tokenizers 0.19 '
                "cannot express; this tokenizer cannot be converted for MindNLP 0.4.1."
            )
        converted.append(f"{left} {right}")
    data["model"]["merges"] = converted
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return [f"tokenizer.json: {len(converted)} merges written as 'a b' strings"]


def _rope_scaling(rope: dict[str, Any]) -> dict[str, Any]:
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type", "type")}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if "mrope_section" in scaling and rope_type == "default":
        # Qwen2-VL's released config spells multimodal RoPE as type "mrope"; MindNLP maps it back to "default".
        rope_type = "mrope"
    scaling["type"] = rope_type
    return scaling


def fix_config(path: Path) -> list[str]:
    """Flatten ``text_config`` and ``rope_parameters`` to the top level; return the changes made."""
    config = _read_json(path)
    changes = []
    text = config.pop("text_config", None)
    if isinstance(text, dict):
        moved = []
        for key, value in text.items():
            if key in ("model_type", "architectures"):
                continue
            if config.get(key) != value:
                moved.append(key)
            config[key] = value
        changes.append(f"config.json: {len(moved)} text_config settings moved to the top level")
    rope = config.pop("rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        config["rope_scaling"] = _rope_scaling(rope)
        changes.append(f"config.json: rope_parameters became rope_theta + rope_scaling {config['rope_scaling']}")
    if "dtype" in config and "torch_dtype" not in config:
        config["torch_dtype"] = config["dtype"]
        changes.append("config.json: torch_dtype added from dtype")
    if changes:
        _write_json(path, config)
    return changes


def fix_processor(folder: Path) -> list[str]:
    """Write ``preprocessor_config.json`` with ``min_pixels``/``max_pixels``; drop ``processor_config.json``."""
    changes = []
    pre_path = folder / "preprocessor_config.json"
    proc_path = folder / "processor_config.json"
    if pre_path.exists():
        pre = _read_json(pre_path)
    elif proc_path.exists() and isinstance(_read_json(proc_path).get("image_processor"), dict):
        pre = dict(_read_json(proc_path)["image_processor"])
        pre.setdefault("processor_class", _read_json(proc_path).get("processor_class", "Qwen2VLProcessor"))
        changes.append("preprocessor_config.json: written from processor_config.json's image_processor")
    else:
        raise StageError(
            f"{folder}: neither preprocessor_config.json nor processor_config.json with an image_processor; "
            "was the processor saved with the merged model?"
        )
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    for key, size_key, default in (
        ("min_pixels", "shortest_edge", DEFAULT_MIN_PIXELS),
        ("max_pixels", "longest_edge", DEFAULT_MAX_PIXELS),
    ):
        if key not in pre:
            pre[key] = int(size.get(size_key, size.get(key, default)))
            changes.append(f"preprocessor_config.json: {key} = {pre[key]}")
    if changes:
        _write_json(pre_path, pre)
    if proc_path.exists():
        proc_path.unlink()
        changes.append("processor_config.json: removed (MindNLP 0.4.1 rejects its nested processors)")
    return changes


def fix_chat_template(folder: Path) -> list[str]:
    """Write ``chat_template.json`` from ``chat_template.jinja`` or the tokenizer config."""
    target = folder / "chat_template.json"
    if target.exists():
        return []
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        template = jinja.read_text(encoding="utf-8")
        source = "chat_template.jinja"
    else:
        template = _read_json(folder / "tokenizer_config.json").get("chat_template")
        source = "tokenizer_config.json"
    if not template:
        raise StageError(
            f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json); "
            "the board could not format prompts."
        )
    _write_json(target, {"chat_template": template})
    return [f"chat_template.json: written from {source}"]


def fix_tokenizer_config(path: Path) -> list[str]:
    """Rename a list-valued ``extra_special_tokens`` to ``additional_special_tokens``."""
    config = _read_json(path)
    extra = config.get("extra_special_tokens")
    if not isinstance(extra, list):
        return []
    config.pop("extra_special_tokens")
    merged = list(config.get("additional_special_tokens") or [])
    merged += [token for token in extra if token not in merged]
    config["additional_special_tokens"] = merged
    _write_json(path, config)
    return ["tokenizer_config.json: extra_special_tokens renamed to additional_special_tokens"]


def _renamed(name: str) -> str:
    for old, new in WEIGHT_RENAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def rename_weights(src: Path, dest: Path) -> int:
    """Copy a safetensors file, renaming its tensors to the old layout in the header only; return renames.

    The data section is copied byte for byte: tensor offsets are relative to
    its start, so a new header of any length keeps them valid.
    """
    with src.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
        renamed = {(_renamed(k) if k != "__metadata__" else k): v for k, v in header.items()}
        count = sum(1 for k in header if k != "__metadata__" and _renamed(k) != k)
        if count == 0:
            shutil.copyfile(src, dest)
            return 0
        new_header = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
        # Safetensors pads the header with spaces so the data starts 8-byte aligned.
        new_header += b" " * (-len(new_header) % 8)
        with dest.open("wb") as out:
            out.write(struct.pack("<Q", len(new_header)))
            out.write(new_header)
            shutil.copyfileobj(handle, out, COPY_CHUNK)
    return count


def copy_weights(src_dir: Path, dest_dir: Path) -> list[str]:
    """Copy every safetensors file (and its index), renaming tensors to the layout MindNLP 0.4.1 expects."""
    changes = []
    shards = sorted(src_dir.glob("*.safetensors"))
    if not shards:
        raise StageError(f"{src_dir}: no *.safetensors weights; the board needs the merged weights in safetensors.")
    # A broken file would otherwise be found only on the board, after the whole upload.
    check_weights(src_dir, REMERGE_FIX)
    total = 0
    for shard in shards:
        total += rename_weights(shard, dest_dir / shard.name)
    index = src_dir / INDEX_NAME
    if index.exists():
        data = _read_json(index)
        data["weight_map"] = {_renamed(k): v for k, v in data.get("weight_map", {}).items()}
        _write_json(dest_dir / index.name, data)
    if total:
        changes.append(f"safetensors: {total} tensors renamed from model.language_model./model.visual. to model./visual.")
    return changes


# --------------------------------------------------------------------------- checks and main


def check_export(src: Path, dest: Path) -> None:
    """Raise :class:`StageError` when the output would still load wrong in MindNLP 0.4.1."""
    source = _read_json(src / "config.json")
    expected = dict(source)
    expected.update(source.get("text_config") or {})
    config = _read_json(dest / "config.json")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key in expected and config.get(key) != expected[key]:
            raise StageError(f"{dest}/config.json: {key} is {config.get(key)}, expected {expected[key]} from {src}.")
        if key not in config:
            raise StageError(f"{dest}/config.json: {key} missing; MindNLP 0.4.1 would fall back to its default.")
    if "mrope_section" not in (config.get("rope_scaling") or {}):
        raise StageError(f"{dest}/config.json: rope_scaling has no mrope_section; Qwen2-VL needs it.")
    merges = _read_json(dest / "tokenizer.json").get("model", {}).get("merges", [])
    if not all(isinstance(m, str) for m in merges):
        raise StageError(f"{dest}/tokenizer.json: merges are not all 'a b' strings.")
    pre = _read_json(dest / "preprocessor_config.json")
    if "min_pixels" not in pre or "max_pixels" not in pre:
        raise StageError(f"{dest}/preprocessor_config.json: min_pixels/max_pixels missing.")


def export(src: Path, dest: Path) -> list[str]:
    """Write the board checkpoint for ``src`` into ``dest`` atomically; return the changes made."""
    src = Path(src)
    for required in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if not (src / required).is_file():
            raise StageError(f"{src}: {required} not found; is {src} a complete merged Qwen2-VL export?")

    with atomic_path(dest) as out:
        out.mkdir()
        for path in sorted(src.iterdir()):
            if path.is_file() and not path.name.endswith(".safetensors") and path.name != INDEX_NAME:
                shutil.copyfile(path, out / path.name)
        changes = copy_weights(src, out)
        changes += fix_tokenizer(out / "tokenizer.json")
        changes += fix_tokenizer_config(out / "tokenizer_config.json")
        changes += fix_config(out / "config.json")
        changes += fix_processor(out)
        changes += fix_chat_template(out)
        check_export(src, out)
        _write_json(out / REPORT_NAME, {"source": str(src), "changes": changes})
    return changes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        print("usage: python -m stages.board_export MERGED_DIR BOARD_DIR", file=sys.stderr)
        return 2
    try:
        # No board_export params, but every stage rejects an invalid params.yaml before working.
        load_params()
        changes = export(Path(argv[0]), Path(argv[1]))
    except (StageError, ParamsError) as exc:
        log.error("%s", exc)
        return 1
    for change in changes:
        log.info("%s", change)
    log.info("board checkpoint written to %s (%d fixes)", argv[1], len(changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
