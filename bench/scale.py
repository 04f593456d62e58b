"""Run download, filter, convert and split on 10,000 and 100,000 synthetic records; report memory, disk and files.

Run (about 10 minutes on 2 cores; ``--sizes 2000`` for a quick check)::

    .venv/bin/python -m bench.scale
    .venv/bin/python -m bench.scale --sizes 10000,100000

For each size, a loopback corpus server (bench/http_corpus.py, ``fast``
mix: 70% dead URLs that fail at once, small 1-3 KB images) serves the URLs,
and each stage runs as ``python -m stages.<name>`` with params.yaml
unchanged apart from the paths. The script prints, per stage and size,
wall time, records/s, peak RSS of the stage's process tree, and the files
and bytes of its output folder, then the ratio of peak RSS between the
largest and smallest size. The base model for convert is the tiny offline
Qwen2-VL of ``stages.base``, built once into the work folder.

Hanging URLs are left out of this mix: at 1% of 100,000 URLs they would
keep 32 download threads busy for about 15 minutes on timeouts alone, and
bench/download_vs_img2dataset.py already measures them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

from bench.http_corpus import Corpus, CorpusServer, expected_successes
from bench.measure import MIB, PYTHON, ROOT, RunResult, cpu_description, folder_stats, run_measured

STAGES = ("download", "filter", "convert", "split")


def write_params(path: Path, source: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = str(source)
    params["data"]["image_root"] = str(source.parent)  # every image.path is a URL; the folder only has to exist
    params["data"]["limit"] = 0
    params["download"]["allow_private_hosts"] = True  # the corpus server listens on 127.0.0.1
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return params


def ensure_base_model(folder: Path, params_path: Path, timeout: float) -> Path:
    """Build the tiny base model into ``folder/base`` unless it is there; return its path."""
    model = folder / "base"
    if not (model / "config.json").exists():
        result = run_measured([PYTHON, "-m", "stages.base", model, "--params", params_path], timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"stages.base exited {result.returncode}:\n{result.output}")
    return model


def stage_command(stage: str, run: Path, source: Path, model: Path, params: Path) -> list:
    metrics = ["--params", params, "--metrics", run / "metrics" / f"{stage}.json"]
    if stage == "download":
        return [PYTHON, "-m", "stages.download", source, run / "downloaded", *metrics]
    if stage == "filter":
        return [PYTHON, "-m", "stages.filter", run / "downloaded", run / "filtered", *metrics]
    if stage == "convert":
        return [PYTHON, "-m", "stages.convert", run / "filtered", run / "converted", model, *metrics]
    return [PYTHON, "-m", "stages.split", run / "converted", run / "dataset", *metrics]


OUTPUTS = {"download": "downloaded", "filter": "filtered", "convert": "converted", "split": "dataset"}


def run_size(n: int, work: Path, timeout: float) -> dict[str, dict]:
    """Run the four stages on ``n`` records; return per-stage measurements."""
    run = work / f"n{n}"
    shutil.rmtree(run, ignore_errors=True)
    (run / "metrics").mkdir(parents=True)
    corpus = Corpus(work, n, seed=1, mix="fast", profile="small")
    rows: dict[str, dict] = {}
    with CorpusServer(corpus) as server:
        params_path = run / "params.yaml"
        params = write_params(params_path, corpus.jsonl)
        model = ensure_base_model(work, params_path, timeout)
        print(f"\n{n} records, {expected_successes(corpus.kinds(), params['download']['retries'])} alive URLs, "
              f"corpus {corpus.jsonl.name}", flush=True)
        server.reset()
        for stage in STAGES:
            result: RunResult = run_measured(stage_command(stage, run, corpus.jsonl, model, params_path),
                                             timeout=timeout)
            if result.returncode != 0:
                raise RuntimeError(f"stage {stage} exited {result.returncode} at n={n}:\n{result.output}")
            metrics = json.loads((run / "metrics" / f"{stage}.json").read_text())
            files, size = folder_stats(run / OUTPUTS[stage])
            rows[stage] = {"seconds": result.seconds, "records": metrics["records"], "peak_rss": result.peak_rss,
                           "cpu": result.cpu_seconds, "files": files, "bytes": size,
                           "kept": metrics.get("kept", metrics.get("train", 0) + metrics.get("test", 0))}
            row = rows[stage]
            print(f"  {stage:9s} {row['seconds']:7.1f} s  {row['records'] / row['seconds']:8.0f} records/s  "
                  f"kept {row['kept']:6d}  peak RSS {row['peak_rss'] / MIB:6.0f} MiB  CPU {row['cpu']:6.1f} s  "
                  f"output {row['files']:4d} files {row['bytes'] / MIB:7.1f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000",
                        help="comma-separated record counts to run, smallest first (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench",
                        help="scratch folder (default: build/bench); each size writes its outputs to n<SIZE>/")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before one stage run is killed")
    args = parser.parse_args(argv)
    sizes = sorted(int(size) for size in args.sizes.split(","))

    work = args.work_dir.resolve() / "scale"
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {cpu_description()}")
    results = {n: run_size(n, work, args.timeout) for n in sizes}

    small, large = sizes[0], sizes[-1]
    print(f"\npeak RSS, MiB ({small} -> {large} records), and output files at {large}:")
    for stage in STAGES:
        before, after = results[small][stage]["peak_rss"] / MIB, results[large][stage]["peak_rss"] / MIB
        print(f"  {stage:9s} {before:6.0f} -> {after:6.0f}  x{after / before:.2f}   "
              f"{results[large][stage]['files']} files, {results[large][stage]['bytes'] / MIB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
