"""Tests for stages.evaluate: the scores on known strings and a real LLaMA-Factory prediction run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages import evaluate
from stages.common import WALL_CLOCK_KEYS
from tests.model_fixtures import run_stage, write_params


@pytest.mark.parametrize(
    ("predictions", "references", "expected"),
    [
        (["서울 광장에서"], ["서울 광장에서"], evaluate.Scores(100.0, 100.0, 100.0, 100.0)),
        (["abcd"], ["wxyz"], evaluate.Scores(0.0, 0.0, 0.0, 0.0)),
        ([""], ["서울"], evaluate.Scores(0.0, 0.0, 0.0, 0.0)),
        # chrF: mean P = mean R over orders 1-4 = (3/4 + 2/3 + 1/2 + 0) / 4.
        # BLEU: (3/4 * 2/3 * 1/2 * 1/2) ** (1/4); the zero 4-gram count is smoothed to 1/2.
        # ROUGE-L: LCS 3 of 4 characters on both sides.
        (["abcd"], ["abce"], evaluate.Scores(47.9167, 59.4604, 75.0, 59.4604)),
        # Whitespace is ignored by chrF, char BLEU and ROUGE-L, but LLaMA-Factory's BLEU-4 counts the space:
        # (4/5 * 2/4 * 1/6 * 1/8) ** (1/4), with the zero 3- and 4-gram counts smoothed to 1/(2*3) and 1/(4*2).
        (["서울 광장"], ["서울광장"], evaluate.Scores(100.0, 100.0, 100.0, 30.2138)),
        # Corpus level for chrF and char BLEU (n-gram counts summed), per-sample mean for the other two.
        (["abcd", "서울 광장"], ["abce", "서울광장"], evaluate.Scores(73.9583, 72.3127, 87.5, 44.8371)),
    ],
)
def test_scores_exact_values(predictions: list[str], references: list[str], expected: evaluate.Scores) -> None:
    assert evaluate.score(predictions, references) == expected


def test_gain_is_tuned_minus_base() -> None:
    tuned = evaluate.Scores(50.0, 40.0, 30.0, 34.85)
    base = evaluate.Scores(10.0, 5.5, 30.0, 0.51)

    assert evaluate.gain(tuned, base) == {"chrf": 40.0, "char_bleu": 34.5, "rouge_l_char": 0.0, "bleu_4": 34.34}


def test_score_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references and 1 labels"):
        evaluate.score(["a", "b"], ["a"])


@pytest.mark.slow
def test_evaluate_stage_outputs(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path, merged_model_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml", evaluate={"max_samples": 3, "batch_size": 2, "max_new_tokens": 8})
    out, metrics_path = tmp_path / "eval", tmp_path / "metrics" / "evaluate.json"

    run_stage("evaluate", tiny_dataset_dir, merged_model_dir, tiny_model_dir, out, "--params", params, "--metrics", metrics_path)

    lines = [json.loads(line) for line in (out / evaluate.PREDICTIONS_NAME).read_text(encoding="utf-8").splitlines()]
    test_rows = pq.read_table(tiny_dataset_dir / "test").to_pylist()[:3]
    assert [line["img_id"] for line in lines] == [row["img_id"] for row in test_rows]
    assert [line["reference"] for line in lines] == [row["caption"] for row in test_rows]
    assert all(set(line) == {"img_id", "reference", "prediction", "base_prediction"} for line in lines)

    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    references = [line["reference"] for line in lines]
    generated = (out / "merged" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    labels = [json.loads(line)["label"] for line in generated]
    # The qwen2_vl template ends the assistant turn with <|im_end|> and a newline, which the decoded label keeps.
    assert labels == [reference + "\n" for reference in references]
    merged = evaluate.score([line["prediction"] for line in lines], references, labels)
    base = evaluate.score([line["base_prediction"] for line in lines], references, labels)
    assert metrics["samples"] == 3
    assert metrics["merged"] == merged.__dict__
    assert metrics["base"] == base.__dict__
    assert metrics["gain"] == evaluate.gain(merged, base)

    # Our BLEU-4 is LLaMA-Factory's: it rounds each sample to 4 decimals before averaging, hence the tolerance.
    reported = json.loads((out / "merged" / "predict_results.json").read_text(encoding="utf-8"))
    assert metrics["merged"]["bleu_4"] == pytest.approx(reported["predict_bleu-4"], abs=1e-3)
    # Wall-clock fields would make the output hash differ between equal runs.
    for name in ("predict_results.json", "all_results.json"):
        kept = json.loads((out / "merged" / name).read_text(encoding="utf-8"))
        assert not set(kept) & WALL_CLOCK_KEYS, name
    ran = (out / "merged" / evaluate.CONFIG_NAME).read_text(encoding="utf-8")
    assert "do_sample: false" in ran
    assert f"output_dir: {out / 'merged'}" in ran


@pytest.mark.slow
def test_evaluate_without_base(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path, merged_model_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml", evaluate={"max_samples": 1, "max_new_tokens": 4, "score_base": False})
    out, metrics_path = tmp_path / "eval", tmp_path / "evaluate.json"

    run_stage("evaluate", tiny_dataset_dir, merged_model_dir, tiny_model_dir, out, "--params", params, "--metrics", metrics_path)

    lines = (out / evaluate.PREDICTIONS_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert "base_prediction" not in json.loads(lines[0])
    assert not (out / "base").exists()
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    assert set(metrics) == {"samples", "merged"}


def test_missing_test_split_rejected(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = write_params(tmp_path / "params.yaml")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "dataset_info.json").write_text(json.dumps({"silu_train": {}}), encoding="utf-8")

    process = run_stage(
        "evaluate", tmp_path / "dataset", tiny_model_dir, tiny_model_dir, tmp_path / "eval", "--params", params, check=False
    )

    assert process.returncode == 1
    assert "has no `silu_test` entry (found ['silu_train'])" in process.stderr
    assert not (tmp_path / "eval").exists()
