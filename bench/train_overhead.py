"""Measure the train stage's overhead over a bare ``llamafactory-cli train`` of the same config.

The pipeline run is ``python -m stages.train`` (params check, dataset and
cutoff check, DVCLive logging, adapter_config.json normalisation around
LLaMA-Factory's ``run_exp``). The bare run is ``llamafactory-cli train`` on
the ``llamafactory_train.yaml`` that the pipeline run wrote, with only
``output_dir`` changed. The two alternate, each run in a fresh process; the
script prints the median wall time and median peak RSS of each and their
ratios. Goal: pipeline wall <= 1.05 x bare wall.

Run (tiny model and a generated 32-sample dataset, CPU, about 5 minutes)::

    python -m bench.train_overhead --runs 5

Pass ``--dataset data/dataset --base models/base`` to time the real data
instead. Not a test: it prints numbers and always exits 0 unless a run fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from bench.measure import RunResult, clean_env, cpu_description, median, run_measured


def measure(command: list[str]) -> RunResult:
    """Run ``command`` once with wall time and peak RSS of its process tree recorded; exit on failure."""
    # One intra-op thread for both variants: on a shared 2-core machine the tiny model's steps take
    # about 0.05 s with one thread and about 0.8 s with two (measured), which buries the overhead in noise.
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    result = run_measured(command, env=clean_env({"OMP_NUM_THREADS": threads}))
    if result.returncode != 0:
        raise SystemExit(f"benchmark run failed with exit code {result.returncode}: {' '.join(command)}\n{result.output}")
    return result


def prepare(work: Path, samples: int) -> tuple[Path, Path]:
    """Build the tiny base model and a generated dataset under ``work``."""
    from stages.base import build_tiny_model
    from tests.model_fixtures import write_dataset

    base = build_tiny_model(work / "base")
    dataset = write_dataset(work / "dataset", base, train=samples, test=2)
    return dataset, base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant (default 5)")
    parser.add_argument("--samples", type=int, default=32, help="train samples of the generated dataset")
    parser.add_argument("--steps", type=int, default=16, help="train.max_steps of each run")
    parser.add_argument("--dataset", help="existing split dataset folder instead of a generated one")
    parser.add_argument("--base", help="existing base model folder instead of the tiny one")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="train-overhead-") as tmp:
        work = Path(tmp)
        if args.dataset and args.base:
            dataset, base = Path(args.dataset).resolve(), Path(args.base).resolve()
        else:
            dataset, base = prepare(work, args.samples)
        params = work / "params.yaml"
        params.write_text(
            yaml.safe_dump({"train": {"max_steps": args.steps, "epochs": 100.0, "per_device_train_batch_size": 2}}),
            encoding="utf-8",
        )
        pipeline = [
            sys.executable, "-m", "stages.train", str(dataset), str(base), str(work / "adapter-pipeline"),
            "--params", str(params), "--metrics", str(work / "metrics"),
        ]  # fmt: skip
        # One pipeline run first, so the bare run has the generated config to start from.
        measure(pipeline)
        config = yaml.safe_load((work / "adapter-pipeline" / "llamafactory_train.yaml").read_text(encoding="utf-8"))
        config["output_dir"] = str(work / "adapter-bare")
        bare_config = work / "bare.yaml"
        bare_config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        cli = str(Path(sys.executable).parent / "llamafactory-cli")
        bare = [cli, "train", str(bare_config)]

        results: dict[str, list[RunResult]] = {"pipeline": [], "bare": []}
        for run in range(args.runs):
            # Alternate the order so that drifting machine load hits both variants alike.
            order = ("pipeline", "bare") if run % 2 == 0 else ("bare", "pipeline")
            for name in order:
                results[name].append(measure(pipeline if name == "pipeline" else bare))
                print(f"run {run + 1}/{args.runs} {name}: {results[name][-1].seconds:.2f} s", file=sys.stderr)

    wall = {name: median([r.seconds for r in runs]) for name, runs in results.items()}
    rss = {name: median([r.peak_rss for r in runs]) / (1024 * 1024) for name, runs in results.items()}
    print(cpu_description())
    print(f"runs per variant: {args.runs}, max_steps: {args.steps}, OMP_NUM_THREADS: {os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"fixed overhead (median wall difference): {wall['pipeline'] - wall['bare']:.2f} s")
    for name in ("bare", "pipeline"):
        walls = ", ".join(f"{r.seconds:.2f}" for r in results[name])
        print(f"{name:9s} median wall {wall[name]:7.2f} s  median peak RSS {rss[name]:7.1f} MiB  (walls: {walls})")
    print(f"wall ratio pipeline/bare: {wall['pipeline'] / wall['bare']:.3f} (goal <= 1.05)")
    print(f"peak RSS ratio pipeline/bare: {rss['pipeline'] / rss['bare']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
