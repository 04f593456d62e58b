"""Download the same URL list with our download stage and with img2dataset, in one run, and compare.

Run (creates ``.venv-bench`` with the pinned img2dataset on first use)::

    .venv/bin/python -m bench.download_vs_img2dataset            # 3000 URLs, 3 runs each
    .venv/bin/python -m bench.download_vs_img2dataset --n 1000 --runs 1

Both tools read the same URLs from a loopback corpus server
(bench/http_corpus.py, ``web`` fault mix: 70% dead) and run as child
processes, measured from start to exit, interpreter start included. Runs are
interleaved (ours, theirs, theirs, ours, ...) so load from other work on the
machine falls on both. Per tool the script prints the median over the runs
of wall time, URLs/s, images/s (successful downloads per second) and peak RSS
of the process tree, and the ratio of our images/s to img2dataset's.

Settings. Ours uses params.yaml's ``download`` section unchanged, except
that ``data.source`` points at the corpus (and ``--retries`` or
``--workers`` when given). img2dataset 1.47.0 gets the same per-request
timeout (our ``download.read_timeout``), the same retry count and the same
total number of concurrent downloads. These are split over
``--i2d-processes`` processes, one per CPU by default, as its README
advises. It gets one shard per process, its best case, because it waits
for a shard's slowest URL before starting the next shard. The other
settings are ``resize_mode=no``, ``skip_reencode`` (JPEGs are decoded to
check them but written unchanged), no EXIF extraction,
``output_format=files`` and sha256 hashes, which ours computes too.
img2dataset decodes every image with OpenCV, which our download stage
leaves to the filter stage.

Both tools must keep the same URLs. On a difference the script lists every
URL that one kept and the other did not, with its fault kind, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from bench.http_corpus import MIXES, Corpus, CorpusServer, expected_successes
from bench.measure import MIB, PYTHON, ROOT, RunResult, clean_env, cpu_description, median, run_measured

BENCH_VENV = ROOT / ".venv-bench"
BENCH_REQUIREMENTS = ROOT / "bench" / "requirements-bench.txt"
IMG2DATASET = BENCH_VENV / "bin" / "img2dataset"


@dataclass
class ToolRun:
    """One measured run of one tool."""

    tool: str
    result: RunResult
    kept_urls: set[str]
    in_tool_seconds: float | None  # the tool's own timing of its download phase, when it reports one
    requests: dict[str, int] = field(default_factory=dict)  # served by the corpus, per fault kind

    @property
    def images(self) -> int:
        return len(self.kept_urls)


# --------------------------------------------------------------------------- environment


def ensure_bench_venv() -> None:
    """Create ``.venv-bench`` with bench/requirements-bench.txt when img2dataset is missing from it."""
    if IMG2DATASET.exists():
        return
    print(f"creating {BENCH_VENV} with {BENCH_REQUIREMENTS.name} (img2dataset and its dependencies)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "--quiet", "-r", str(BENCH_REQUIREMENTS)], check=True)


# --------------------------------------------------------------------------- the two tools


def write_our_params(path: Path, source: Path, retries: int | None, workers: int | None) -> dict[str, Any]:
    """Write params.yaml with ``data.source`` set to the corpus; return its ``download`` section."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["source"] = str(source)
    # Every image.path is a URL; the folder only has to exist.
    params["data"]["image_root"] = str(source.parent)
    params["data"]["limit"] = 0
    params["download"]["allow_private_hosts"] = True  # the corpus server listens on 127.0.0.1
    if retries is not None:
        params["download"]["retries"] = retries
    if workers is not None:
        params["download"]["workers"] = workers
    path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return params["download"]


def run_ours(source: Path, params_path: Path, out: Path, timeout: float) -> ToolRun:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    metrics = out.parent / f"{out.name}-metrics.json"
    command = [PYTHON, "-m", "stages.download", source, out / "shards", "--params", params_path, "--metrics", metrics]
    result = run_measured(command, env=clean_env({"SILU_LOG_LEVEL": "INFO"}), timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"our download stage exited {result.returncode}:\n{result.output}")
    kept = set()
    for manifest in sorted((out / "shards").glob("shard-*.jsonl")):
        for line in manifest.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["status"] == "ok":
                kept.add(entry["url"])
    match = re.search(r"reused \d+, skipped \d+ of \d+ shards, ([\d.]+) s", result.output)
    return ToolRun("ours", result, kept, float(match.group(1)) if match else None)


def write_img2dataset_input(source: Path, path: Path) -> None:
    """Write the URLs and captions of the SiLu file as flat JSON lines, the form img2dataset reads."""
    with source.open(encoding="utf-8") as lines, path.open("w", encoding="utf-8") as out:
        for line in lines:
            record = json.loads(line)
            out.write(json.dumps({"url": record["image"]["path"], "caption": record["captions"]["content"]},
                                 ensure_ascii=False) + "\n")


def run_img2dataset(url_list: Path, out: Path, settings: dict[str, Any], timeout: float) -> ToolRun:
    shutil.rmtree(out, ignore_errors=True)
    command = [IMG2DATASET, "--url_list", url_list, "--input_format", "jsonl", "--url_col", "url",
               "--caption_col", "caption", "--output_folder", out, "--output_format", "files",
               "--resize_mode", "no", "--skip_reencode", "True", "--extract_exif", "False",
               "--compute_hash", "sha256", "--enable_wandb", "False", "--disallowed_header_directives", "[]"]
    for key, value in settings.items():
        command += [f"--{key}", str(value)]
    result = run_measured(command, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"img2dataset exited {result.returncode}:\n{result.output}")
    kept = set()
    for part in sorted(out.glob("*.parquet")):
        table = pq.read_table(part, columns=["url", "status"]).to_pydict()
        kept.update(url for url, status in zip(table["url"], table["status"], strict=True) if status == "success")
    starts, ends = [], []
    for stats_file in out.glob("*_stats.json"):
        stats = json.loads(stats_file.read_text())
        starts.append(stats["start_time"])
        ends.append(stats["end_time"])
    in_tool = max(ends) - min(starts) if starts else None
    return ToolRun("img2dataset", result, kept, in_tool)


# --------------------------------------------------------------------------- report


def explain_difference(ours: ToolRun, theirs: ToolRun, kinds_by_url: dict[str, str]) -> list[str]:
    """Return one line per URL that one tool kept and the other did not."""
    lines = []
    for url in sorted(ours.kept_urls - theirs.kept_urls):
        lines.append(f"  kept by ours only: {url} ({kinds_by_url.get(url, '?')})")
    for url in sorted(theirs.kept_urls - ours.kept_urls):
        lines.append(f"  kept by img2dataset only: {url} ({kinds_by_url.get(url, '?')})")
    return lines


def summarise(runs: list[ToolRun], urls: int) -> dict[str, float]:
    seconds = median([run.result.seconds for run in runs])
    in_tool = [run.in_tool_seconds for run in runs if run.in_tool_seconds]
    return {
        "seconds": seconds,
        "urls_per_s": urls / seconds,
        "images": median([run.images for run in runs]),
        "images_per_s": median([run.images / run.result.seconds for run in runs]),
        "in_tool_seconds": median(in_tool) if in_tool else float("nan"),
        "peak_rss_mib": median([run.result.peak_rss / MIB for run in runs]),
        "cpu_seconds": median([run.result.cpu_seconds for run in runs]),
        "requests": median([sum(run.requests.values()) for run in runs]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.download_vs_img2dataset",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="URLs in the corpus (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per tool; the median is reported (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan (default: %(default)s)")
    parser.add_argument("--retries", type=int, help="retries for both tools (default: params.yaml download.retries)")
    parser.add_argument("--workers", type=int,
                        help="concurrent downloads for both tools (default: params.yaml download.workers)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="web",
                        help="fault mix of the corpus, see bench/http_corpus.py (default: %(default)s)")
    parser.add_argument("--i2d-processes", type=int, default=0,
                        help="img2dataset processes; 0 = one per usable CPU (default: %(default)s)")
    parser.add_argument("--i2d-shard-size", type=int, default=0,
                        help="img2dataset number_sample_per_shard; 0 = one shard per process (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench",
                        help="scratch folder for the corpus and outputs (default: build/bench)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a tool run is killed")
    args = parser.parse_args(argv)

    ensure_bench_venv()
    work = args.work_dir.resolve() / "download"
    work.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(args.work_dir.resolve(), args.n, args.seed, mix=args.mix, profile="photos")

    with CorpusServer(corpus) as server:
        download = write_our_params(work / "params.yaml", corpus.jsonl, args.retries, args.workers)
        retries = download["retries"]
        workers = download["workers"]
        processes = args.i2d_processes or len(os.sched_getaffinity(0))
        i2d_settings = {
            "processes_count": processes,
            "thread_count": max(1, workers // processes),
            "timeout": download["read_timeout"],
            "retries": retries,
            # img2dataset waits for the slowest URL of a shard before starting the next, so one
            # shard per process (the default) is its best case at this N.
            "number_sample_per_shard": args.i2d_shard_size or -(-args.n // processes),
        }
        url_list = work / "urls.jsonl"
        write_img2dataset_input(corpus.jsonl, url_list)
        kinds = corpus.kinds()
        urls = [json.loads(line)["image"]["path"] for line in corpus.jsonl.read_text(encoding="utf-8").splitlines()]
        kinds_by_url = dict(zip(urls, kinds, strict=True))
        expected = expected_successes(kinds, retries)

        print(f"machine: {cpu_description()}")
        print(f"corpus: {args.n} URLs ({expected} alive with {retries} retries), {args.mix} fault mix, seed {args.seed}")
        print(f"ours: workers {workers}, connect/read timeout {download['connect_timeout']}/"
              f"{download['read_timeout']} s, deadline {download['deadline']} s, retries {retries}, "
              f"shard_size {download['shard_size']}")
        print(f"img2dataset: {i2d_settings}")

        results: dict[str, list[ToolRun]] = {"ours": [], "img2dataset": []}
        failed = False
        for run in range(args.runs):
            order = ["ours", "img2dataset"] if run % 2 == 0 else ["img2dataset", "ours"]
            pair: dict[str, ToolRun] = {}
            for tool in order:
                server.reset()
                if tool == "ours":
                    outcome = run_ours(corpus.jsonl, work / "params.yaml", work / "ours", args.timeout)
                else:
                    outcome = run_img2dataset(url_list, work / "img2dataset", i2d_settings, args.timeout)
                outcome.requests = server.stats()
                pair[tool] = outcome
                results[tool].append(outcome)
                print(f"run {run + 1} {tool:12s} {outcome.result.seconds:7.2f} s  {outcome.images} images  "
                      f"{outcome.images / outcome.result.seconds:7.1f} images/s  "
                      f"peak RSS {outcome.result.peak_rss / MIB:6.0f} MiB  CPU {outcome.result.cpu_seconds:6.1f} s  "
                      f"{sum(outcome.requests.values())} requests", flush=True)
            if pair["ours"].kept_urls != pair["img2dataset"].kept_urls:
                failed = True
                print(f"run {run + 1}: the tools kept different URLs (expected {expected}):")
                print("\n".join(explain_difference(pair["ours"], pair["img2dataset"], kinds_by_url)))

    ours, theirs = summarise(results["ours"], args.n), summarise(results["img2dataset"], args.n)
    print(f"\nmedians of {args.runs} run(s), {args.n} URLs, {expected} alive:")
    print(f"{'tool':12s} {'wall s':>8s} {'in-tool s':>9s} {'URLs/s':>8s} {'images':>7s} {'images/s':>9s} "
          f"{'peak RSS MiB':>12s} {'CPU s':>7s} {'requests':>9s}")
    for name, row in (("ours", ours), ("img2dataset", theirs)):
        print(f"{name:12s} {row['seconds']:8.2f} {row['in_tool_seconds']:9.2f} {row['urls_per_s']:8.1f} "
              f"{row['images']:7.0f} {row['images_per_s']:9.1f} {row['peak_rss_mib']:12.0f} {row['cpu_seconds']:7.1f} "
              f"{row['requests']:9.0f}")
    print(f"ratio ours/img2dataset images/s: {ours['images_per_s'] / theirs['images_per_s']:.2f} (goal >= 1.5)")
    # With other work on the cores, wall time depends on the share each tool got; CPU time does not.
    print(f"ratio ours/img2dataset URLs per CPU-second: {theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}")
    if failed:
        print("error: the tools kept different URLs; see the lists above.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
