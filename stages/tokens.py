"""Count a sample's tokens exactly as LLaMA-Factory 0.9.5 will when it trains on it.

``cutoff_len`` in LLaMA-Factory counts text and image tokens together, and
a sample over it is truncated through its image tokens, which crashes
training at the first step ("Image features and image tokens do not
match"). The convert stage therefore drops such samples, and needs the
same count LLaMA-Factory computes.

The count reuses LLaMA-Factory's own code wherever it exists:

- text: the model's tokenizer as LLaMA-Factory loads it, and the chat
  template's ``encode_multiturn`` (system prompt, role markers, end tokens),
  through ``SupervisedDatasetProcessor._encode_data_example``;
- image size: the template plugin's ``_preprocess_image`` (the
  ``image_max_pixels`` / ``image_min_pixels`` resize and the Qwen2-VL
  minimum side and aspect fixes), run on a stand-in that carries only a
  size, so no pixels are decoded;
- image tokens: the processor's ``get_number_of_image_patches`` (the
  ``smart_resize`` to multiples of 28), divided by ``merge_size**2``.

Only the last step differs from training: the image placeholder is
expanded to one image token, then the true number is added, because
decoding and preprocessing every image costs about 0.1 s per 1000x700
photo on one CPU core. ``tests/test_convert.py`` checks the result against
LLaMA-Factory's full path with real images.

NOTE: ``_encode_data_example`` and ``_preprocess_image`` are private
methods of llamafactory 0.9.5. Rerun ``tests/test_convert.py`` after any
LLaMA-Factory upgrade, because they may change without notice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from stages.common import StageError
from stages.templates import check_template


class _SizeOnlyImage:
    """A stand-in for a PIL image that has a size and no pixels.

    LLaMA-Factory's ``_preprocess_image`` reads ``width``, ``height`` and
    ``mode`` and calls ``resize`` and ``convert``. Here these only track the
    size, so running it costs nothing whatever the image size.
    """

    mode = "RGB"

    def __init__(self, width: int, height: int):
        self.width = width
        self.height = height

    def resize(self, size: tuple[int, int], *args: Any, **kwargs: Any) -> _SizeOnlyImage:
        return _SizeOnlyImage(*size)

    def convert(self, mode: str) -> _SizeOnlyImage:
        return self


class TokenCounter:
    """Token counts of single-image ShareGPT samples under one model, template and pixel limits."""

    def __init__(self, model_dir: str | Path, template: str, image_max_pixels: int, image_min_pixels: int):
        check_template(template)
        # LLaMA-Factory imports torch and transformers: seconds, so only when counting.
        from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
        from llamafactory.data.template import get_template_and_fix_tokenizer
        from llamafactory.extras.constants import IMAGE_PLACEHOLDER
        from llamafactory.hparams import DataArguments, ModelArguments
        from llamafactory.model import load_tokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer_config.json").is_file():
            raise StageError(
                f"{model_dir}: no tokenizer_config.json; run the base stage first (dvc repro base) "
                "or pass the folder of a Qwen2-VL checkpoint."
            )
        model_args = ModelArguments(
            model_name_or_path=str(model_dir), image_max_pixels=image_max_pixels, image_min_pixels=image_min_pixels
        )
        # A cutoff no sample reaches, so the count is never truncated.
        data_args = DataArguments(template=template, cutoff_len=2**31 - 1)
        loaded = load_tokenizer(model_args)
        self.tokenizer = loaded["tokenizer"]
        self.processor = loaded["processor"]
        if self.processor is None or getattr(self.processor, "image_processor", None) is None:
            raise StageError(f"{model_dir}: no image processor found; convert needs a vision-language checkpoint.")
        self.template = get_template_and_fix_tokenizer(self.tokenizer, data_args)
        self.placeholder = IMAGE_PLACEHOLDER
        self.image_max_pixels = image_max_pixels
        self.image_min_pixels = image_min_pixels

        plugin = self.template.mm_plugin
        if plugin.image_token is None:
            raise StageError(f"template {template!r} does not take images; use a vision template such as qwen2_vl.")
        self._plugin = plugin
        # The same template, with each image expanded to a single image token.
        single_token = dataclasses.replace(self.template, mm_plugin=dataclasses.replace(plugin, expand_mm_tokens=False))
        self._encoder = SupervisedDatasetProcessor(
            template=single_token, tokenizer=self.tokenizer, processor=self.processor, data_args=data_args
        )
        self.special_tokens = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)

    def image_tokens(self, width: int, height: int) -> int:
        """Return the image tokens LLaMA-Factory inserts for one ``width`` x ``height`` image."""
        resized = self._plugin._preprocess_image(
            _SizeOnlyImage(width, height),
            image_max_pixels=self.image_max_pixels,
            image_min_pixels=self.image_min_pixels,
        )
        image_processor = self.processor.image_processor
        patches = image_processor.get_number_of_image_patches(resized.height, resized.width, {})
        return patches // image_processor.merge_size**2

    def count(self, messages: list[dict[str, str]], sizes: list[tuple[int, int]]) -> int:
        """Return the length of ``input_ids`` LLaMA-Factory builds for one sample.

        ``messages`` alternate user and assistant turns, the last one the
        assistant's. ``sizes`` contains ``(width, height)`` of each image, in
        the order of the image placeholders.
        """
        input_ids, _ = self._encoder._encode_data_example(
            prompt=messages[:-1],
            response=messages[-1:],
            system="",
            tools="",
            images=[None] * len(sizes),
            videos=[],
            audios=[],
        )
        return len(input_ids) + sum(self.image_tokens(width, height) - 1 for width, height in sizes)
