"""Run the filter stage and a bare Pillow decoding loop over the same images, and compare their speed.

Run::

    .venv/bin/python -m bench.filter_vs_decode              # 4000 images, 3 runs each
    .venv/bin/python -m bench.filter_vs_decode --n 1000 --runs 1

The input is a download-stage output built directly (no HTTP): ``--n``
images from the corpus generator of bench/http_corpus.py, in shards of
``download.shard_size`` records with their manifests. Of its 16 ``photos``
base images, 14 are baseline JPEGs of 20-200 KB. The filter re-encodes the
other two, a progressive JPEG and a 430 KB PNG.

Both sides run as child processes, measured from start to exit, and are
interleaved. The decoding loop reads the same tar members and calls
``Image.open(...).load()`` on every image in a ``multiprocessing.Pool``
with one process per usable CPU. It writes nothing. The filter stage runs
with params.yaml's ``filter`` section. The script prints the median wall
time, images/s, CPU time and peak RSS of each side, and the ratio of the
filter's images/s to the loop's.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from multiprocessing import Pool
from pathlib import Path

import yaml

from bench.http_corpus import Bodies, load_bases
from bench.measure import MIB, PYTHON, ROOT, RunResult, cpu_description, median, run_measured

# --------------------------------------------------------------------------- input


def build_download_output(folder: Path, n: int, shard_size: int, bases_folder: Path) -> int:
    """Write ``n`` images as download shards (tar + manifest) into ``folder``; return the bytes written."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    bodies = Bodies(load_bases(bases_folder, "photos"))
    total = 0
    for shard in range(-(-n // shard_size)):
        lines = range(shard * shard_size, min(n, (shard + 1) * shard_size))
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar, \
                (folder / f"shard-{shard:05d}.jsonl").open("w", encoding="utf-8") as manifest:
            for index in lines:
                body = bodies.body(index)
                sha = hashlib.sha256(body).hexdigest()
                info = tarfile.TarInfo(sha)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
                total += len(body)
                entry = {"line": index + 1, "img_id": f"bench-{index}", "url": f"http://127.0.0.1/{index}.jpg",
                         "status": "ok", "reason": None, "detail": None, "member": sha, "sha256": sha,
                         "bytes": len(body), "content_type": "image/jpeg", "caption": f"사진 {index}",
                         "lang": "ko", "resolution": list(bodies.size_of(index)), "categories": {}}
                manifest.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return total


# --------------------------------------------------------------------------- the decoding loop


def decode(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def iter_members(folder: Path):
    for tar_path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                yield tar.extractfile(member).read()


def decode_loop(folder: Path) -> int:
    """Decode every tar member under ``folder`` on all usable CPUs; print and return the image count."""
    started = time.monotonic()
    count = 0
    with Pool(len(os.sched_getaffinity(0))) as pool:
        for _ in pool.imap(decode, iter_members(folder), chunksize=8):
            count += 1
    print(f"decoded {count} images in {time.monotonic() - started:.2f} s")
    return count


# --------------------------------------------------------------------------- comparison


def run_filter(downloaded: Path, out: Path, params_path: Path, timeout: float) -> RunResult:
    shutil.rmtree(out, ignore_errors=True)
    metrics = out.parent / "filter-metrics.json"
    result = run_measured([PYTHON, "-m", "stages.filter", downloaded, out, "--params", params_path,
                           "--metrics", metrics], timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the filter stage exited {result.returncode}:\n{result.output}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.filter_vs_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="images (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per side; the median is reported (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "bench",
                        help="scratch folder (default: build/bench)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed")
    parser.add_argument("--decode-loop", type=Path, metavar="FOLDER",
                        help="only run the decoding loop over the download shards in FOLDER (used by the benchmark)")
    args = parser.parse_args(argv)
    if args.decode_loop:
        decode_loop(args.decode_loop)
        return 0

    work = args.work_dir.resolve() / "filter"
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params_path = work / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    downloaded = work / "downloaded"
    size = build_download_output(downloaded, args.n, params["download"]["shard_size"], args.work_dir.resolve())

    print(f"machine: {cpu_description()}")
    print(f"input: {args.n} images, {size / MIB:.0f} MiB in {len(list(downloaded.glob('*.tar')))} shard(s); "
          f"filter params {params['filter']}")
    results: dict[str, list[RunResult]] = {"filter": [], "decode loop": []}
    for run in range(args.runs):
        order = ["filter", "decode loop"] if run % 2 == 0 else ["decode loop", "filter"]
        for side in order:
            if side == "filter":
                result = run_filter(downloaded, work / "filtered", params_path, args.timeout)
            else:
                result = run_measured([PYTHON, "-m", "bench.filter_vs_decode", "--decode-loop", downloaded],
                                      timeout=args.timeout)
                if result.returncode != 0:
                    raise RuntimeError(f"the decoding loop exited {result.returncode}:\n{result.output}")
            results[side].append(result)
            print(f"run {run + 1} {side:12s} {result.seconds:7.2f} s  {args.n / result.seconds:7.1f} images/s  "
                  f"CPU {result.cpu_seconds:6.1f} s  peak RSS {result.peak_rss / MIB:6.0f} MiB", flush=True)

    metrics = json.loads((work / "filter-metrics.json").read_text())
    print(f"\nfilter kept {metrics['kept']} of {metrics['records']}, re-encoded {metrics['reencoded']}")
    print(f"medians of {args.runs} run(s), {args.n} images:")
    print(f"{'side':12s} {'wall s':>8s} {'images/s':>9s} {'CPU s':>7s} {'peak RSS MiB':>12s}")
    rates, cpu = {}, {}
    for side, runs in results.items():
        seconds = median([run.seconds for run in runs])
        rates[side] = median([args.n / run.seconds for run in runs])
        cpu[side] = median([run.cpu_seconds for run in runs])
        print(f"{side:12s} {seconds:8.2f} {rates[side]:9.1f} {cpu[side]:7.1f} "
              f"{median([run.peak_rss / MIB for run in runs]):12.0f}")
    print(f"ratio filter/decode loop images/s: {rates['filter'] / rates['decode loop']:.2f} (goal >= 0.9)")
    # With other work on the cores, wall time depends on the share each side got; CPU time does not.
    print(f"ratio filter/decode loop images per CPU-second: {cpu['decode loop'] / cpu['filter']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
