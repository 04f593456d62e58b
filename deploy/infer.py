"""Answer image questions on the board with MindSpore + MindNLP 0.4.1 (runs on the board's Python 3.9).

The deploy stage copies this file into each release on the board and runs it
there; run it by hand on the board (or with the stand-in's ``.venv-board``)::

    python -u infer.py --model model --requests samples/requests.jsonl --device Ascend

``--requests`` is a JSON lines file, one request per line:
``{"id": "...", "image": "images/000.jpg", "prompt": "..."}``, with the image
path relative to the requests file. The model folder is a Qwen2-VL checkpoint
that MindNLP 0.4.1 can load (``python -m stages.board_export`` writes one).

Output on stdout, one JSON object per line, each flushed as soon as it exists:

- first a load record: ``{"type": "load", "python", "mindspore", "mindnlp",
  "device", "dtype", "import_s", "load_s", "ascend_workarounds", "error"}``;
- then one record per request: ``{"type": "answer", "id", "output",
  "latency_s", "new_tokens", "token_ids", "tokens_per_s", "error"}``.

Library messages written to stdout are moved to stderr, so stdout carries
only these records. Exit status: 0 when every request was answered, 1 when
any request failed, 2 when the model could not be loaded or the arguments
are invalid.

``--device CPU`` loads float32 weights (bfloat16 fails on the CPU); ``Ascend``
loads float16. ``--ascend-workarounds`` applies the recipe that public
reports give for Qwen2-VL ``generate()`` on the Ascend 310B with MindNLP 0.4.1:
PyNative mode with PyBoost and GE off, int32 input ids, the sequence left-
padded to a multiple of 128, attention matmuls done as 2-D matmuls, images
resized to 336x336 and a fixed Qwen2-VL chat template. NOTE: these
workarounds are unverified on a real 310B; they were run only on the CPU
stand-in, which needs none of them.
"""

import argparse
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Dict, List, Optional, TextIO

PAD_MULTIPLE = 128
WORKAROUND_IMAGE_SIZE = (336, 336)
# The Qwen2-VL-Instruct chat template, written out so the board does not depend on a Jinja template.
SYSTEM_PROMPT = "You are a helpful assistant."
PROMPT_TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Answer image questions with MindNLP on the board.")
    parser.add_argument("--model", required=True, help="Model folder that MindNLP 0.4.1 loads.")
    parser.add_argument("--requests", required=True, help="JSON lines file of {id, image, prompt}.")
    parser.add_argument("--device", choices=["CPU", "Ascend"], default="Ascend", help="MindSpore device target.")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="Tokens generated per answer.")
    parser.add_argument(
        "--ascend-workarounds",
        action="store_true",
        help="Apply the Ascend 310B generate() workarounds (unverified on real hardware).",
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    return args


def emit(out: TextIO, record: Dict[str, Any]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


def read_requests(path: str) -> List[Dict[str, Any]]:
    folder = os.path.dirname(os.path.abspath(path))
    requests = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            request = json.loads(line)
            for key in ("id", "image", "prompt"):
                if key not in request:
                    raise ValueError("%s line %d: missing key %r" % (path, number, key))
            request["image"] = os.path.join(folder, request["image"])
            requests.append(request)
    return requests


# --------------------------------------------------------------------------- Ascend workarounds


def set_workaround_environment() -> None:
    """Turn PyBoost and GE off; MindSpore reads these only when it is imported."""
    os.environ["MS_ENABLE_PYBOOST"] = "0"
    os.environ["MS_ENABLE_GE"] = "0"


class _Matmul2D:
    """Stand-in for the ``ops`` module of MindNLP's Qwen2-VL code whose ``matmul`` does 2-D matmuls only."""

    def __init__(self, ops: Any, mindspore: Any) -> None:
        self._ops = ops
        self._stack = mindspore.ops.stack

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def matmul(self, left: Any, right: Any) -> Any:
        if left.ndim <= 2 or left.shape[:-2] != right.shape[:-2]:
            return self._ops.matmul(left, right)
        batch = tuple(left.shape[:-2])
        left_flat = left.reshape((-1,) + tuple(left.shape[-2:]))
        right_flat = right.reshape((-1,) + tuple(right.shape[-2:]))
        products = [self._ops.matmul(left_flat[i], right_flat[i]) for i in range(left_flat.shape[0])]
        result = self._stack(products)
        return result.reshape(batch + tuple(result.shape[-2:]))


def patch_batched_matmul(mindspore: Any) -> None:
    """Route the attention matmuls of MindNLP's Qwen2-VL through 2-D matmuls.

    NOTE: only ``ops.matmul`` in the attention layers is replaced; the rotary
    embedding's ``@`` product stays batched.
    """
    from mindnlp.transformers.models.qwen2_vl import modeling_qwen2_vl

    if not isinstance(modeling_qwen2_vl.ops, _Matmul2D):
        modeling_qwen2_vl.ops = _Matmul2D(modeling_qwen2_vl.ops, mindspore)


def left_pad(ids: Any, pad_id: int, mindspore: Any) -> Dict[str, Any]:
    """Left-pad a (1, n) id array to a multiple of 128 tokens; return int32 ``input_ids`` and ``attention_mask``."""
    import numpy

    length = ids.shape[1]
    extra = -(-length // PAD_MULTIPLE) * PAD_MULTIPLE - length
    padded = numpy.concatenate([numpy.full((ids.shape[0], extra), pad_id, dtype=numpy.int32), ids.astype(numpy.int32)], 1)
    mask = numpy.concatenate(
        [numpy.zeros((ids.shape[0], extra), dtype=numpy.int32), numpy.ones(ids.shape, dtype=numpy.int32)], 1
    )
    return {"input_ids": mindspore.Tensor(padded), "attention_mask": mindspore.Tensor(mask)}


def greedy_padded(model: Any, inputs: Dict[str, Any], max_new_tokens: int, pad_id: int, mindspore: Any) -> List[int]:
    """Greedy decoding that keeps the sequence shape fixed: int32 ids left-padded to a multiple of 128.

    ``generate()`` appends int64 tokens to the ids (its concat fails on int32)
    and grows the sequence by one each step, so this loop recomputes the
    whole padded sequence without a KV cache instead. The shape then changes
    only every 128 tokens. Slower per token than ``generate()``.
    """
    import numpy

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    prompt = inputs["input_ids"].asnumpy()
    generated = []  # type: List[int]
    for _ in range(max_new_tokens):
        ids = numpy.concatenate([prompt, numpy.array([generated], dtype=prompt.dtype)], 1) if generated else prompt
        padded = left_pad(ids, pad_id, mindspore)
        position_ids, _ = model.get_rope_index(
            padded["input_ids"], inputs["image_grid_thw"], None, padded["attention_mask"]
        )
        outputs = model(
            input_ids=padded["input_ids"],
            attention_mask=padded["attention_mask"],
            position_ids=position_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            use_cache=False,
            return_dict=True,
        )
        next_id = int(outputs.logits[0, -1].argmax().asnumpy())
        generated.append(next_id)
        if next_id in eos_ids:
            break
    return generated


# --------------------------------------------------------------------------- model


def load_model(args: argparse.Namespace) -> Dict[str, Any]:
    """Import MindSpore and MindNLP, load the processor and model; return them with timings and versions."""
    if args.ascend_workarounds:
        set_workaround_environment()
    # MindSpore's C++ log goes to stderr; 3 keeps only errors.
    os.environ.setdefault("GLOG_v", "3")
    started = time.monotonic()
    import mindspore

    # MindNLP reads the device when it is imported, so set it first.
    mindspore.set_device(args.device)
    if args.ascend_workarounds:
        mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
    # Asynchronous kernel launch made generation 10-30x slower on a 2-core CPU; blocking launch avoids it.
    mindspore.runtime.launch_blocking()
    from mindnlp.transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    if args.ascend_workarounds:
        patch_batched_matmul(mindspore)
    imported = time.monotonic()

    dtype = mindspore.float32 if args.device == "CPU" else mindspore.float16
    processor = Qwen2VLProcessor.from_pretrained(args.model)
    model = Qwen2VLForConditionalGeneration.from_pretrained(args.model, ms_dtype=dtype)
    model.set_train(False)
    loaded = time.monotonic()
    return {
        "mindspore": mindspore,
        "processor": processor,
        "model": model,
        "dtype": "float32" if args.device == "CPU" else "float16",
        "import_s": imported - started,
        "load_s": loaded - imported,
    }


def versions() -> Dict[str, Optional[str]]:
    found = {"python": platform.python_version(), "mindspore": None, "mindnlp": None}
    try:
        from importlib import metadata

        for key, names in (("mindspore", ("mindspore", "mindspore-dev")), ("mindnlp", ("mindnlp",))):
            for name in names:
                try:
                    found[key] = metadata.version(name)
                    break
                except metadata.PackageNotFoundError:
                    continue
    except ImportError:
        pass
    return found


def answer(loaded: Dict[str, Any], request: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """Generate a greedy answer for one request; return the answer record."""
    from PIL import Image

    mindspore = loaded["mindspore"]
    processor = loaded["processor"]
    model = loaded["model"]
    started = time.monotonic()
    with Image.open(request["image"]) as opened:
        image = opened.convert("RGB")
    if args.ascend_workarounds:
        image = image.resize(WORKAROUND_IMAGE_SIZE, Image.BICUBIC)
        text = PROMPT_TEMPLATE.format(system=SYSTEM_PROMPT, prompt=request["prompt"])
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": request["prompt"]}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="ms")

    generate_started = time.monotonic()
    if args.ascend_workarounds:
        pad_id = processor.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = processor.tokenizer.eos_token_id
        new_ids = greedy_padded(model, inputs, args.max_new_tokens, pad_id, mindspore)
    else:
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new_ids = output[0, prompt_length:].asnumpy().tolist()
    generate_s = time.monotonic() - generate_started
    text_out = processor.tokenizer.decode(new_ids, skip_special_tokens=True)
    return {
        "type": "answer",
        "id": request["id"],
        "output": text_out,
        "latency_s": round(time.monotonic() - started, 4),
        "new_tokens": len(new_ids),
        "token_ids": new_ids,
        "tokens_per_s": round(len(new_ids) / generate_s, 3) if generate_s > 0 else None,
        "error": None,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Records go to the original stdout; anything else written to fd 1 (library prints) goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if args.ascend_workarounds and args.device != "Ascend":
        sys.stderr.write("warning: --ascend-workarounds on device %s; they are meant for the 310B\n" % args.device)

    load_record = {"type": "load", "device": args.device, "ascend_workarounds": args.ascend_workarounds}
    load_record.update(versions())
    try:
        requests = read_requests(args.requests)
        loaded = load_model(args)
    except Exception as exc:  # noqa: BLE001 - any load failure ends the run with its message
        traceback.print_exc()
        load_record["error"] = "%s: %s" % (type(exc).__name__, exc)
        emit(out, load_record)
        return 2
    load_record.update(
        {
            "dtype": loaded["dtype"],
            "import_s": round(loaded["import_s"], 3),
            "load_s": round(loaded["load_s"], 3),
            "requests": len(requests),
            "error": None,
        }
    )
    emit(out, load_record)

    failed = 0
    for request in requests:
        started = time.monotonic()
        try:
            record = answer(loaded, request, args)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
            traceback.print_exc()
            failed += 1
            record = {
                "type": "answer",
                "id": request["id"],
                "output": None,
                "latency_s": round(time.monotonic() - started, 4),
                "new_tokens": 0,
                "tokens_per_s": None,
                "error": "%s: %s" % (type(exc).__name__, exc),
            }
        emit(out, record)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
