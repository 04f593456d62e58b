"""Generate captions for the test split and score them against the references.

Generation is LLaMA-Factory 0.9.5's ``predict_with_generate`` on ``silu_test``
with greedy decoding (``do_sample: false``), so prompts, template and image
resizing are exactly those of training. It runs with the merged model and,
when ``evaluate.score_base`` is true, with the base model, so the metrics
show the gain from fine-tuning.

Run (tiny model, CPU, about 40 s)::

    python -m stages.evaluate data/dataset models/merged models/base data/eval

Outputs: ``OUT/predictions.jsonl`` (one line per test sample: ``img_id``,
``reference``, ``prediction`` and ``base_prediction`` when the base is
scored), LLaMA-Factory's own files under ``OUT/merged/`` and ``OUT/base/``,
and ``--metrics`` (default ``metrics/evaluate.json``).

Scores (0-100, higher is better), chosen because Korean is not segmented
into words the way LLaMA-Factory's jieba-based ROUGE expects:

- ``chrf``: sacrebleu chrF (character 6-grams, beta 2, whitespace ignored), corpus level.
- ``char_bleu``: sacrebleu corpus BLEU with ``tokenize="char"`` (whitespace ignored).
- ``rouge_l_char``: ROUGE-L F1 over the characters of each sample, whitespace
  removed, averaged over samples.
- ``bleu_4``: LLaMA-Factory's BLEU-4, for comparison with figures it reports:
  NLTK ``sentence_bleu`` over the characters (spaces included) with smoothing
  method 3, averaged over samples. The reference is LLaMA-Factory's decoded
  label, which with the ``qwen2_vl`` template ends in the newline after
  ``<|im_end|>``. Predictions stop before that newline, so the score is a
  little lower than against the bare caption, as in LLaMA-Factory's report.

Not covered: sampling-based decoding and multi-GPU prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.common import StageError, atomic_path, drop_wall_clock, get_logger, write_json
from stages.config import Params, ParamsError, load_params

log = get_logger(__name__)

TEST_DATASET = "silu_test"
CONFIG_NAME = "llamafactory_predict.yaml"
PREDICTIONS_NAME = "predictions.jsonl"


# --------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class Scores:
    """Caption scores of one model on the test split, each 0-100."""

    chrf: float
    char_bleu: float
    rouge_l_char: float
    bleu_4: float


def _lcs_length(first: str, second: str) -> int:
    previous = [0] * (len(second) + 1)
    for a in first:
        current = [0]
        for j, b in enumerate(second, start=1):
            current.append(previous[j - 1] + 1 if a == b else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_char(prediction: str, reference: str) -> float:
    """Return ROUGE-L F1 (0-1) over the non-whitespace characters of two strings."""
    hypothesis = "".join(prediction.split())
    target = "".join(reference.split())
    if not hypothesis or not target:
        return 0.0
    lcs = _lcs_length(hypothesis, target)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(target)
    return 2 * precision * recall / (precision + recall)


def llamafactory_bleu_4(prediction: str, reference: str) -> float:
    """Return one sample's BLEU-4 (0-1) exactly as LLaMA-Factory 0.9.5's ``ComputeSimilarity`` computes it."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)


def score(predictions: list[str], references: list[str], labels: list[str] | None = None) -> Scores:
    """Score ``predictions`` against ``references`` (same order, same length).

    ``labels`` are the references as LLaMA-Factory decodes them, used for
    ``bleu_4`` only; they default to ``references``.
    """
    import sacrebleu

    labels = references if labels is None else labels
    if not len(predictions) == len(references) == len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references and {len(labels)} labels")
    if not references:
        raise ValueError("no samples to score")
    count = len(references)
    return Scores(
        chrf=round(sacrebleu.corpus_chrf(predictions, [references]).score, 4),
        char_bleu=round(sacrebleu.corpus_bleu(predictions, [references], tokenize="char").score, 4),
        rouge_l_char=round(100 * sum(map(rouge_l_char, predictions, references)) / count, 4),
        bleu_4=round(100 * sum(map(llamafactory_bleu_4, predictions, labels)) / count, 4),
    )


def gain(tuned: Scores, base: Scores) -> dict[str, float]:
    """Return the per-metric difference tuned - base."""
    base_values = asdict(base)
    return {name: round(value - base_values[name], 4) for name, value in asdict(tuned).items()}


# --------------------------------------------------------------------------- test split


def read_test_split(dataset_dir: Path, max_samples: int) -> list[dict[str, Any]]:
    """Return ``img_id`` and reference caption of each test sample in the order LLaMA-Factory reads them."""
    import pyarrow.parquet as pq

    info_path = dataset_dir / "dataset_info.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{info_path} not found; run the split stage first (dvc repro split).") from None
    if TEST_DATASET not in info:
        raise StageError(f"{info_path} has no `{TEST_DATASET}` entry (found {sorted(info)}); rerun the split stage.")
    source = dataset_dir / info[TEST_DATASET]["file_name"]
    # LLaMA-Factory 0.9.5 concatenates a folder's files in os.listdir order; read them in the same order.
    files = [source / name for name in os.listdir(source)] if source.is_dir() else [source]
    rows: list[dict[str, Any]] = []
    for path in files:
        rows.extend(pq.read_table(path, columns=["img_id", "messages"]).to_pylist())
    if max_samples:
        rows = rows[:max_samples]
    if not rows:
        raise StageError(f"{source}: `{TEST_DATASET}` has no samples; evaluate needs at least one.")
    samples = []
    for row in rows:
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        if not answers:
            raise StageError(f"{source}: sample {row['img_id']} has no assistant message to use as reference.")
        samples.append({"img_id": row["img_id"], "reference": answers[-1]})
    return samples


def _same_text(first: str, second: str) -> bool:
    # The Qwen2 tokenizer NFC-normalises, so a decoded label can differ from the stored caption in form only.
    return unicodedata.normalize("NFC", first).strip() == unicodedata.normalize("NFC", second).strip()


# --------------------------------------------------------------------------- generation


def build_config(params: Params, dataset_dir: Path, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Return the LLaMA-Factory predict arguments for one model; keys are LLaMA-Factory's own."""
    evaluate, convert = params.evaluate, params.convert
    config: dict[str, Any] = {
        "stage": "sft",
        "do_predict": True,
        "predict_with_generate": True,
        "finetuning_type": "lora",
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        "template": params.train.template,
        "dataset_dir": str(dataset_dir),
        "media_dir": str(dataset_dir),
        "eval_dataset": TEST_DATASET,
        "cutoff_len": convert.cutoff_len,
        "image_max_pixels": convert.image_max_pixels,
        "image_min_pixels": convert.image_min_pixels,
        "preprocessing_num_workers": params.train.preprocessing_num_workers,
        "overwrite_cache": True,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "per_device_eval_batch_size": evaluate.batch_size,
        "max_new_tokens": evaluate.max_new_tokens,
        # Greedy decoding: LLaMA-Factory samples by default, which would make scores vary between runs.
        "do_sample": False,
        "seed": params.train.seed,
        "report_to": "none",
    }
    if evaluate.max_samples:
        config["max_samples"] = evaluate.max_samples
    return config


def predict(config: dict[str, Any], samples: list[dict[str, Any]], final_dir: Path) -> tuple[list[str], list[str]]:
    """Run LLaMA-Factory prediction with ``config``; return the predictions and LLaMA-Factory's decoded labels.

    Each label is checked against its sample's reference, so the lines can be joined to ``img_id`` by position.

    ``final_dir`` is where ``config["output_dir"]`` ends up after the atomic rename;
    the recorded config names it.
    """
    from llamafactory.train.tuner import run_exp

    out_dir = Path(config["output_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**config, "output_dir": str(final_dir)}
    header = "# LLaMA-Factory 0.9.5 predict config generated by `python -m stages.evaluate` from params.yaml.\n"
    (out_dir / CONFIG_NAME).write_text(header + yaml.safe_dump(record, sort_keys=False), encoding="utf-8")
    try:
        run_exp(dict(config))
    except ValueError as exc:
        raise StageError(f"LLaMA-Factory prediction with {config['model_name_or_path']} failed: {exc}") from exc
    drop_wall_clock(out_dir)
    path = out_dir / "generated_predictions.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != len(samples):
        raise StageError(f"{path}: {len(lines)} predictions for {len(samples)} test samples.")
    for index, (line, sample) in enumerate(zip(lines, samples, strict=True)):
        # Guards the img_id join: the predictions come back in dataset order, with no id of their own.
        if not _same_text(line["label"], sample["reference"]):
            raise StageError(
                f"{path}: line {index + 1} has label {line['label'][:60]!r} but test sample {sample['img_id']} has "
                f"reference {sample['reference'][:60]!r}; the test split order changed under LLaMA-Factory."
            )
    return [line["predict"] for line in lines], [line["label"] for line in lines]


def evaluate(
    params: Params,
    dataset_dir: str | Path,
    merged_dir: str | Path,
    base_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
) -> dict[str, Any]:
    """Generate with the merged (and base) model, write predictions and metrics, and return the metrics."""
    dataset_dir, merged_dir, base_dir, out_dir = map(Path, (dataset_dir, merged_dir, base_dir, out_dir))
    samples = read_test_split(dataset_dir, params.evaluate.max_samples)
    references = [s["reference"] for s in samples]
    models = {"merged": merged_dir}
    if params.evaluate.score_base:
        models["base"] = base_dir
    for model_dir in models.values():
        if not (model_dir / "config.json").is_file():
            raise StageError(f"{model_dir}/config.json not found; run the stage that writes it (dvc repro).")
    log.info("evaluating on %d test samples", len(samples))
    with atomic_path(out_dir) as tmp:
        outputs: dict[str, list[str]] = {}
        labels: list[str] = []
        for name, model_dir in models.items():
            log.info("generating with the %s model %s", name, model_dir)
            config = build_config(params, dataset_dir, model_dir, tmp / name)
            outputs[name], labels = predict(config, samples, out_dir / name)

        with open(tmp / PREDICTIONS_NAME, "w", encoding="utf-8") as handle:
            for index, sample in enumerate(samples):
                line = {"img_id": sample["img_id"], "reference": sample["reference"]}
                line["prediction"] = outputs["merged"][index]
                if "base" in outputs:
                    line["base_prediction"] = outputs["base"][index]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")

    metrics: dict[str, Any] = {"samples": len(samples), "merged": asdict(score(outputs["merged"], references, labels))}
    if "base" in outputs:
        base_scores = score(outputs["base"], references, labels)
        metrics["base"] = asdict(base_scores)
        metrics["gain"] = gain(Scores(**metrics["merged"]), base_scores)
    write_json(metrics_path, metrics)
    log.info("scores: %s", json.dumps(metrics, ensure_ascii=False))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="split dataset folder (dataset_info.json with silu_test)")
    parser.add_argument("merged", help="merged model folder written by the merge stage")
    parser.add_argument("base", help="base model folder, generated with when evaluate.score_base is true")
    parser.add_argument("out", help="output folder for predictions.jsonl")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="metrics file (default: metrics/evaluate.json)")
    args = parser.parse_args(argv)
    try:
        evaluate(load_params(args.params), args.dataset, args.merged, args.base, args.out, args.metrics)
    except (ParamsError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
