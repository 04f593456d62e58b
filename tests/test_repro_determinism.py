"""Reproducibility: two fresh copies of one commit and params give the same dvc.lock through merge.

The first run is the shared ``pipeline_repo``. This test clones the commit
that run started from (same code, same params, no DVC cache) and runs
``dvc repro merge`` there. Every dep and cached output must hash the same.
The two train metrics outputs hold the run time, which no rerun can repeat,
so for them the test compares the content without the wall-clock fields and
requires everything else in them to be equal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e_plugin import VENV_BIN, PipelineRepo, pipeline_env, record_timing, run

pytestmark = pytest.mark.slow

# Outputs that record wall-clock time (DVCLive's summary and its per-value TSVs),
# and the fields or files inside them that hold it.
WALL_CLOCK_METRICS = "metrics/train/metrics.json"
WALL_CLOCK_FIELDS = ("runtime", "samples_per_second", "steps_per_second")
WALL_CLOCK_PLOTS = "metrics/train/plots/metrics"
WALL_CLOCK_PLOT_FILES = tuple(f"train/{name}.tsv" for name in WALL_CLOCK_FIELDS)


def _summary_without_wall_clock(path: Path) -> dict:
    summary = json.loads(path.read_text(encoding="utf-8"))
    for name in WALL_CLOCK_FIELDS:
        summary.get("train", {}).pop(name, None)
    return summary


def _plot_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def second_run(pipeline_repo: PipelineRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone of the commit the shared run started from, run up to merge."""
    env = pipeline_env()
    path = tmp_path_factory.mktemp("second") / "repo"
    run(["git", "clone", "-q", str(pipeline_repo.path), str(path)], path.parent, env)
    run(["git", "checkout", "-q", pipeline_repo.source_commit], path, env)
    assert not (path / "dvc.lock").exists()

    started = time.monotonic()
    run([str(VENV_BIN / "dvc"), "repro", "merge"], path, env, timeout=1800)
    record_timing("second fresh copy, dvc repro merge", time.monotonic() - started)
    return path


def test_same_commit_same_hashes(pipeline_repo: PipelineRepo, second_run: Path) -> None:
    pipeline_repo.reset()
    first = pipeline_repo.lock("HEAD")["stages"]
    second = yaml.safe_load((second_run / "dvc.lock").read_text(encoding="utf-8"))["stages"]

    assert {"download", "filter", "convert", "split", "base", "train", "merge"} <= set(second)
    for stage, entry in second.items():
        assert entry["cmd"] == first[stage]["cmd"], stage
        assert entry.get("params") == first[stage].get("params"), stage
        assert entry.get("deps") == first[stage].get("deps"), f"{stage}: deps differ"
        first_outs = {out["path"]: out for out in first[stage].get("outs", [])}
        for out in entry.get("outs", []):
            if out["path"] in (WALL_CLOCK_METRICS, WALL_CLOCK_PLOTS):
                continue
            assert out == first_outs[out["path"]], f"{stage}: {out['path']} differs"


def test_train_metrics_differ_only_in_time(pipeline_repo: PipelineRepo, second_run: Path) -> None:
    pipeline_repo.reset()
    first_summary = _summary_without_wall_clock(pipeline_repo.path / WALL_CLOCK_METRICS)
    second_summary = _summary_without_wall_clock(second_run / WALL_CLOCK_METRICS)
    first_plots = _plot_files(pipeline_repo.path / WALL_CLOCK_PLOTS)
    second_plots = _plot_files(second_run / WALL_CLOCK_PLOTS)

    assert first_summary == second_summary
    assert sorted(first_plots) == sorted(second_plots)
    for name, content in second_plots.items():
        if name in WALL_CLOCK_PLOT_FILES:
            # Same rows (one per logged step), only the seconds differ.
            assert len(content.splitlines()) == len(first_plots[name].splitlines()), name
        else:
            assert content == first_plots[name], name
