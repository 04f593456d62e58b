"""Check ``train.template`` against LLaMA-Factory's chat template registry.

LLaMA-Factory raises "Template ... does not exist" only after the model is
loaded, and its message names no params key. The stages that use the
template call :func:`check_template` first, so a typo fails at once.
"""

from __future__ import annotations

import difflib

from stages.common import StageError

# Shown when no registered name is close to the invalid one.
EXAMPLE_TEMPLATES = ("qwen2_vl", "qwen3_vl", "llava", "default")


def check_template(name: str) -> None:
    """Raise :class:`StageError` naming ``train.template`` when ``name`` is not a LLaMA-Factory template."""
    # Importing LLaMA-Factory takes seconds, so only when a stage needs it.
    from llamafactory.data.template import TEMPLATES

    if name in TEMPLATES:
        return
    close = difflib.get_close_matches(name, list(TEMPLATES), n=4)
    examples = close or [example for example in EXAMPLE_TEMPLATES if example in TEMPLATES]
    raise StageError(
        f"`train.template` is {name!r}, which is not a LLaMA-Factory chat template. "
        f"Use one of {', '.join(examples)} ({len(TEMPLATES)} are registered in "
        "llamafactory.data.template.TEMPLATES). Qwen2-VL needs qwen2_vl."
    )
