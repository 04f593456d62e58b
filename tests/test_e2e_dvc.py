"""End-to-end tests of the pipeline through the real ``dvc`` CLI: experiments, params checks, no-change runs.

All tests share one full pipeline run in a temporary copy of the repository
(``pipeline_repo`` in tests/e2e_plugin.py) and reset that copy to its
committed run before they change it.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass

import pytest

from tests.e2e_plugin import PipelineRepo, StageRuns, parse_stage_runs, record_timing, stages_affected_by

pytestmark = pytest.mark.slow

# Target for a `dvc repro` that has nothing to do, on the embedded sample.
NO_CHANGE_LIMIT_S = 3.0
# Each experiment: the name given to `dvc exp run`, the param it sets and the value.
EXPERIMENTS = {
    "train.epochs": ("epochs-3", "3"),
    "split.seed": ("split-seed-7", "7"),
}


@dataclass(frozen=True)
class Experiment:
    """One finished ``dvc exp run``: its output, the stages it ran, and the lock and train metrics it left."""

    name: str
    output: str
    runs: StageRuns
    lock: dict
    train_metrics: dict


@pytest.fixture(scope="module")
def experiments(pipeline_repo: PipelineRepo) -> dict[str, Experiment]:
    """Run each experiment of ``EXPERIMENTS`` from the committed run, keyed by the param it sets."""
    results = {}
    for key, (name, value) in EXPERIMENTS.items():
        pipeline_repo.reset()
        started = time.monotonic()
        output = pipeline_repo.dvc("exp", "run", "--name", name, "-S", f"{key}={value}").stdout
        record_timing(f"dvc exp run -S {key}={value}", time.monotonic() - started)
        train_metrics = json.loads((pipeline_repo.path / "metrics/train/metrics.json").read_text(encoding="utf-8"))
        results[key] = Experiment(name, output, parse_stage_runs(output), pipeline_repo.lock(), train_metrics)
    pipeline_repo.reset()
    return results


def _all_stages(pipeline_repo: PipelineRepo) -> set[str]:
    return set(pipeline_repo.lock("HEAD")["stages"])


@pytest.mark.parametrize("key", sorted(EXPERIMENTS))
def test_exp_reruns_only_downstream(pipeline_repo: PipelineRepo, experiments: dict[str, Experiment], key: str) -> None:
    experiment = experiments[key]
    # check_params depends on the whole params.yaml, so every -S reruns it.
    expected = stages_affected_by(pipeline_repo.path, pipeline_repo.env, key) | {"check_params"}
    untouched = _all_stages(pipeline_repo) - expected

    assert experiment.runs.ran == expected, experiment.output[-3000:]
    assert experiment.runs.skipped == untouched, experiment.output[-3000:]

    baseline = pipeline_repo.lock("HEAD")["stages"]
    for stage in untouched:
        assert experiment.lock["stages"][stage] == baseline[stage], f"{stage} changed in dvc.lock"
    for stage in expected - {"check_params"}:
        assert experiment.lock["stages"][stage] != baseline[stage], f"{stage} did not change in dvc.lock"


def test_exp_epochs_stages_run(pipeline_repo: PipelineRepo, experiments: dict[str, Experiment]) -> None:
    runs = experiments["train.epochs"].runs

    assert {"train", "merge", "evaluate"} <= runs.ran
    assert {"download", "filter", "convert", "split", "base"} <= runs.skipped


def test_exp_split_seed_stages_run(pipeline_repo: PipelineRepo, experiments: dict[str, Experiment]) -> None:
    runs = experiments["split.seed"].runs

    assert {"split", "train", "merge", "evaluate"} <= runs.ran
    assert {"download", "filter", "convert", "base"} <= runs.skipped


def test_exp_epochs_step_count(pipeline_repo: PipelineRepo, experiments: dict[str, Experiment]) -> None:
    baseline = json.loads(pipeline_repo.git("show", "HEAD:metrics/train/metrics.json"))
    epochs = experiments["train.epochs"]
    baseline_epochs = pipeline_repo.lock("HEAD")["stages"]["train"]["params"]["params.yaml"]["train.epochs"]

    assert epochs.lock["stages"]["train"]["params"]["params.yaml"]["train.epochs"] == 3
    # Same data, batch size and accumulation: the optimizer steps scale with the epochs.
    assert epochs.train_metrics["train"]["global_step"] * baseline_epochs == baseline["train"]["global_step"] * 3


def _experiment_revs(show: list[dict]) -> dict[str, dict]:
    """Map experiment name to its ``dvc exp show --json`` record."""
    found = {}
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev
    return found


def test_exp_show_loss_and_scores(pipeline_repo: PipelineRepo, experiments: dict[str, Experiment]) -> None:
    started = time.monotonic()
    show = json.loads(pipeline_repo.dvc("exp", "show", "--json").stdout)
    record_timing("dvc exp show --json", time.monotonic() - started)
    revs = _experiment_revs(show)

    for key, (name, value) in EXPERIMENTS.items():
        assert name in revs, f"{name} missing from dvc exp show; found {sorted(revs)}"
        data = revs[name]["data"]
        section, param = key.split(".")
        assert data["params"]["params.yaml"]["data"][section][param] == int(value)
        train = data["metrics"]["metrics/train/metrics.json"]["data"]
        scores = data["metrics"]["metrics/evaluate.json"]["data"]
        assert isinstance(train["loss"], float)
        assert isinstance(train["train"]["loss"], float)
        assert train["train"]["global_step"] == experiments[key].train_metrics["train"]["global_step"]
        for metric in ("chrf", "char_bleu", "rouge_l_char", "bleu_4"):
            assert isinstance(scores["merged"][metric], (int, float)), f"{name}: merged.{metric}"

    table = list(csv.reader(io.StringIO(pipeline_repo.dvc("exp", "show", "--csv").stdout)))
    header, rows = table[0], {row[0]: row for row in table[1:] if row and row[0]}
    columns = {
        "train.loss": ("metrics/train/metrics.json", "train", "loss"),
        "merged.chrf": ("metrics/evaluate.json", "merged", "chrf"),
    }
    for column, (metrics_file, group, metric) in columns.items():
        # dvc prefixes a column with its file only when the name is not unique.
        index = next((i for i, name in enumerate(header) if name.split(":")[-1] == column), None)
        assert index is not None, f"no {column} column in dvc exp show --csv: {header}"
        for name, _ in EXPERIMENTS.values():
            assert name in rows, f"{name} missing from dvc exp show --csv"
            expected = revs[name]["data"]["metrics"][metrics_file]["data"][group][metric]
            assert float(rows[name][index]) == pytest.approx(expected), f"{name}: {column}"


def test_exp_misspelt_key_named(pipeline_repo: PipelineRepo) -> None:
    pipeline_repo.reset()
    # DVC's Hydra override rejects a key that is not in params.yaml and names it.
    rejected = pipeline_repo.dvc("exp", "run", "-S", "train.epoch=3", check=False)
    pipeline_repo.reset()
    # `+key=value` makes DVC add the key; the check_params stage then stops the run.
    appended = pipeline_repo.dvc("exp", "run", "-S", "+train.epoch=3", check=False)
    pipeline_repo.reset()

    assert rejected.returncode != 0
    assert "train.epoch" in rejected.stdout
    assert parse_stage_runs(rejected.stdout).ran == frozenset()
    assert appended.returncode != 0
    assert "Unknown key `train.epoch`" in appended.stdout
    assert "Did you mean `train.epochs`?" in appended.stdout
    assert parse_stage_runs(appended.stdout).ran == frozenset({"check_params"})


def test_repro_no_change_fast(pipeline_repo: PipelineRepo) -> None:
    pipeline_repo.reset()
    started = time.monotonic()
    output = pipeline_repo.dvc("repro").stdout
    seconds = time.monotonic() - started
    record_timing("dvc repro, nothing changed", seconds)
    runs = parse_stage_runs(output)

    assert runs.ran == frozenset()
    assert runs.skipped == _all_stages(pipeline_repo)
    assert "Data and pipelines are up to date." in output
    assert pipeline_repo.git("status", "--porcelain") == ""
    assert seconds < NO_CHANGE_LIMIT_S, f"no-change dvc repro took {seconds:.2f} s"
