"""Deploy stage: ship the board checkpoint to the OrangePi AIpro over SSH and answer test images there.

Run from the repository root (reads ``params.yaml``: ``deploy.*``)::

    python -m stages.deploy models/board data/dataset data/deploy     # what dvc.yaml runs
    python -m stages.deploy --status                                  # current/previous release
    python -m stages.deploy --rollback                                # switch back to previous

The embedded defaults deploy to the board stand-in (``make board``): empty
``deploy.user``, ``deploy.remote_dir`` and ``deploy.python`` are read from
``.board/standin.json`` when ``deploy.host``/``deploy.port`` are the
stand-in's. A real board needs all three set (docs/board.md).

What a deploy does:

1. picks the first ``deploy.samples`` rows of ``data/dataset/test/*.parquet``
   and writes their images and a requests file;
2. publishes a release of ``model/`` (the board checkpoint), ``infer.py`` and
   ``samples/`` to ``<remote_dir>/releases/<content hash>``: preflight checks,
   hashes on both sides, only missing bytes sent, resumable
   (``stages/board_release.py``);
3. runs ``infer.py`` in that release on the board under ``timeout`` (the
   remote process group gets SIGTERM at ``deploy.run_timeout``, SIGKILL 5 s
   later) and streams its JSON lines back;
4. only when every request was answered, switches ``current`` to the release
   (atomically, by renaming a new symlink over the old one) and prunes old
   releases beyond ``deploy.keep_releases``; the old one stays as
   ``previous``, and ``--rollback`` switches back to it;
5. writes ``data/deploy/answers.jsonl`` (each answer beside its reference)
   and ``metrics/deploy.json`` (load time, latency mean/p50/p95, tokens/s,
   failures, library versions, transfer bytes and speed).

Any failure (board unreachable, host key, login, preflight, upload, a
request that failed, a timeout) raises a :class:`~stages.board_ssh.BoardError`
that names the host, the command and the tail of its stderr, and leaves
``current`` on the board as it was.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import board_release
from stages.board_ssh import (
    BoardConnection,
    BoardError,
    BoardTarget,
    CommandTimeout,
    RemoteCommandError,
    connect,
    quote,
)
from stages.common import StageError, atomic_path, get_logger, write_json
from stages.config import DeployParams, ParamsError, load_params

log = get_logger(__name__)

REPO = Path(__file__).resolve().parent.parent
INFER_SCRIPT = REPO / "deploy" / "infer.py"
STANDIN_FILE = Path(".board/standin.json")
ANSWERS_NAME = "answers.jsonl"
# Seconds between the SIGTERM that `timeout` sends at deploy.run_timeout and its SIGKILL.
KILL_AFTER_S = 5
# Extra seconds the host waits past the remote `timeout` before killing the session itself.
HOST_GRACE_S = 15.0
# GNU timeout's exit status when it ended the command: 124 after SIGTERM, 128 + 9 after SIGKILL.
TIMEOUT_STATUSES = (124, 137)


@dataclass(frozen=True)
class DeployTarget:
    """The board login plus where releases live and which Python runs them."""

    board: BoardTarget
    remote_dir: str
    python: str


@dataclass(frozen=True)
class Sample:
    """One test image with its prompt and reference caption."""

    img_id: str
    prompt: str
    reference: str
    image: bytes


# --------------------------------------------------------------------------- target and samples


def resolve_target(params: DeployParams, standin_file: Path = STANDIN_FILE) -> DeployTarget:
    """Fill the empty ``user``/``remote_dir``/``python`` params from the stand-in record when it is the target."""
    standin: dict[str, Any] = {}
    if standin_file.exists():
        try:
            standin = json.loads(standin_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise StageError(f"{standin_file}: invalid JSON ({exc}); restart the stand-in with `make board`.") from None
    is_standin = bool(standin) and (standin.get("host"), standin.get("port")) == (params.host, params.port)

    def pick(key: str) -> str:
        value = getattr(params, key)
        if value:
            return value
        if is_standin:
            return str(standin[key])
        raise StageError(
            f"`deploy.{key}` is empty and {params.host}:{params.port} is not the board stand-in recorded in "
            f"{standin_file}; set deploy.{key} for your board (docs/board.md) or start the stand-in with `make board`."
        )

    user = params.user or (str(standin["user"]) if is_standin else getpass.getuser())
    board = BoardTarget(
        host=params.host,
        port=params.port,
        user=user,
        key_file=params.key_file,
        known_hosts=Path(params.known_hosts).expanduser(),
        trust_new_host=params.trust_new_host,
        connect_timeout=params.connect_timeout,
        transfer_timeout=params.transfer_timeout,
    )
    return DeployTarget(board, pick("remote_dir"), pick("python"))


def _prompt_of(messages: list[dict[str, str]]) -> str:
    for message in messages:
        if message.get("role") == "user":
            return message.get("content", "").replace("<image>", "").strip()
    return ""


def read_samples(dataset_dir: Path, count: int) -> list[Sample]:
    """Return the first ``count`` samples of the test split, in file and row order."""
    import pyarrow.parquet as pq

    shards = sorted((Path(dataset_dir) / "test").glob("*.parquet"))
    if not shards:
        raise StageError(f"{dataset_dir}/test: no *.parquet shards; run the split stage first (dvc repro split).")
    samples: list[Sample] = []
    for shard in shards:
        table = pq.read_table(shard, columns=["img_id", "caption", "messages", "images"])
        for row in table.to_pylist():
            if not row["images"] or not row["images"][0].get("bytes"):
                log.warning("%s: sample %s has no image bytes; skipped", shard, row["img_id"])
                continue
            samples.append(Sample(row["img_id"], _prompt_of(row["messages"]), row["caption"], row["images"][0]["bytes"]))
            if len(samples) == count:
                return samples
    if not samples:
        raise StageError(f"{dataset_dir}/test: no sample with an image, so there is nothing to send to the board.")
    log.warning("test split has %d samples, fewer than deploy.samples = %d; using all of them", len(samples), count)
    return samples


def _image_suffix(data: bytes) -> str:
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"\x89PNG"):
        return ".png"
    return ".img"


def write_samples(samples: list[Sample], folder: Path) -> dict[str, Path]:
    """Write the images and ``requests.jsonl`` into ``folder``; return them as release entries under ``samples/``."""
    images = folder / "images"
    images.mkdir(parents=True)
    lines = []
    for index, sample in enumerate(samples):
        name = f"images/{index:04d}{_image_suffix(sample.image)}"
        (folder / name).write_bytes(sample.image)
        lines.append(json.dumps({"id": f"{index:04d}", "image": name, "prompt": sample.prompt}, ensure_ascii=False))
    (folder / "requests.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return board_release.directory_entries(folder, "samples")


def release_entries(model_dir: Path, samples_dir: Path, samples: list[Sample], infer_script: Path) -> dict[str, Path]:
    """Map release paths to local files: ``model/...``, ``infer.py``, ``samples/...``."""
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir}: config.json not found; run the board_export stage first (dvc repro board_export).")
    entries = board_release.directory_entries(model_dir, "model")
    entries["infer.py"] = infer_script
    entries.update(write_samples(samples, samples_dir))
    return entries


# --------------------------------------------------------------------------- remote run


def infer_command(release_dir: str, python: str, params: DeployParams) -> str:
    """Return the shell command that runs ``infer.py`` in ``release_dir`` under ``timeout``."""
    args = [
        "timeout",
        "-k",
        str(KILL_AFTER_S),
        f"{params.run_timeout:g}",
        python,
        "-u",
        "infer.py",
        "--model",
        "model",
        "--requests",
        "samples/requests.jsonl",
        "--device",
        params.device,
        "--max-new-tokens",
        str(params.max_new_tokens),
    ]
    if params.ascend_workarounds:
        args.append("--ascend-workarounds")
    # No `exec`, and a command after `timeout` so bash cannot exec it either: the shell outlives
    # `timeout`, and when `timeout` SIGKILLs its own process group the shell still reports exit 137.
    # sshd would send a signal instead of an exit status for an exec'd process, which paramiko drops (-1).
    return f"cd {quote(release_dir)} && " + " ".join(quote(arg) for arg in args) + "; exit $?"


class _RunRecords:
    """Collect the JSON lines ``infer.py`` prints and log progress as they arrive."""

    def __init__(self, host: str, total: int) -> None:
        self.host = host
        self.total = total
        self.load: dict[str, Any] | None = None
        self.answers: dict[str, dict[str, Any]] = {}
        self.other_lines = 0

    def __call__(self, line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            self.other_lines += 1
            log.debug("board %s: %s", self.host, line)
            return
        if not isinstance(record, dict):
            self.other_lines += 1
            return
        if record.get("type") == "load":
            self.load = record
            if record.get("error"):
                log.error("board %s: model load failed: %s", self.host, record["error"])
            else:
                log.info(
                    "board %s: model loaded in %.2f s (imports %.2f s), MindSpore %s, MindNLP %s, %s %s",
                    self.host,
                    record.get("load_s", float("nan")),
                    record.get("import_s", float("nan")),
                    record.get("mindspore"),
                    record.get("mindnlp"),
                    record.get("device"),
                    record.get("dtype"),
                )
        elif record.get("type") == "answer" and isinstance(record.get("id"), str):
            self.answers[record["id"]] = record
            if record.get("error"):
                log.error("board %s: request %s failed: %s", self.host, record["id"], record["error"])
            else:
                log.info(
                    "board %s: answer %d/%d in %.2f s (%s tokens, %s tokens/s)",
                    self.host,
                    len(self.answers),
                    self.total,
                    record.get("latency_s", float("nan")),
                    record.get("new_tokens"),
                    record.get("tokens_per_s"),
                )


def run_inference(conn: BoardConnection, target: DeployTarget, release_dir: str, params: DeployParams, total: int):
    """Run ``infer.py`` in ``release_dir``; return the collected records and the command result."""
    command = infer_command(release_dir, target.python, params)
    records = _RunRecords(conn.host, total)
    log.info("board %s: running %s", conn.host, command)
    result = conn.run(command, params.run_timeout + KILL_AFTER_S + HOST_GRACE_S, on_line=records, check=False)
    if result.exit_status in TIMEOUT_STATUSES:
        raise CommandTimeout(
            conn.host,
            f"inference ran past deploy.run_timeout = {params.run_timeout:g} s and was killed on the board "
            f"(exit {result.exit_status}); raise deploy.run_timeout or lower deploy.samples.",
            command,
            result.stderr,
            result.exit_status,
        )
    if records.load is None or records.load.get("error"):
        reason = records.load["error"] if records.load else "no load record"
        raise RemoteCommandError(
            conn.host,
            f"infer.py could not load the model ({reason}); exit status {result.exit_status}.",
            command,
            result.stderr,
            result.exit_status,
        )
    return records, result


# --------------------------------------------------------------------------- outputs


def percentile(values: list[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) with linear interpolation between ranks, as numpy's default."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def build_answers(samples: list[Sample], records: _RunRecords) -> list[dict[str, Any]]:
    """Pair each sample with the board's answer (or a missing-answer error)."""
    rows = []
    for index, sample in enumerate(samples):
        record = records.answers.get(f"{index:04d}")
        if record is None:
            record = {"output": None, "latency_s": None, "new_tokens": 0, "tokens_per_s": None, "error": "no answer"}
        rows.append(
            {
                "img_id": sample.img_id,
                "prompt": sample.prompt,
                "reference": sample.reference,
                "answer": record.get("output"),
                "latency_s": record.get("latency_s"),
                "new_tokens": record.get("new_tokens"),
                "tokens_per_s": record.get("tokens_per_s"),
                "error": record.get("error"),
            }
        )
    return rows


def build_metrics(
    target: DeployTarget,
    release: board_release.PublishReport,
    records: _RunRecords,
    answers: list[dict[str, Any]],
    run_s: float,
) -> dict[str, Any]:
    load = records.load or {}
    ok = [row for row in answers if not row["error"]]
    latencies = [row["latency_s"] for row in ok]
    speeds = [row["tokens_per_s"] for row in ok if row["tokens_per_s"] is not None]
    return {
        "board": target.board.label,
        "release": release.release,
        "versions": {key: load.get(key) for key in ("python", "mindspore", "mindnlp")},
        "device": load.get("device"),
        "dtype": load.get("dtype"),
        "ascend_workarounds": load.get("ascend_workarounds"),
        "import_s": load.get("import_s"),
        "load_s": load.get("load_s"),
        "run_s": round(run_s, 3),
        "samples": len(answers),
        "failed": len(answers) - len(ok),
        "latency_s": {
            "mean": round(statistics.fmean(latencies), 4) if latencies else None,
            "p50": round(percentile(latencies, 50), 4) if latencies else None,
            "p95": round(percentile(latencies, 95), 4) if latencies else None,
        },
        "tokens_per_s": round(statistics.fmean(speeds), 3) if speeds else None,
        "new_tokens": sum(row["new_tokens"] or 0 for row in ok),
        "transfer": {
            "bytes_total": release.bytes_total,
            "bytes_sent": release.bytes_sent,
            "resumed_bytes": release.resumed_bytes,
            "objects_uploaded": release.objects_uploaded,
            "objects_skipped": release.objects_skipped,
            "upload_s": round(release.upload_s, 3),
            "upload_mb_per_s": round(release.upload_mb_per_s, 1),
            "verify_s": round(release.verify_s, 3),
            "publish_s": round(release.total_s, 3),
        },
    }


def write_answers(path: Path, answers: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in answers), encoding="utf-8")


# --------------------------------------------------------------------------- stage


def deploy(
    params: DeployParams,
    model_dir: Path,
    dataset_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    infer_script: Path = INFER_SCRIPT,
    standin_file: Path = STANDIN_FILE,
) -> dict[str, Any]:
    """Publish, test-run and activate a release on the board; write answers and metrics; return the metrics."""
    target = resolve_target(params, standin_file)
    samples = read_samples(dataset_dir, params.samples)
    staging = Path(tempfile.mkdtemp(prefix="silu-deploy-"))
    try:
        entries = release_entries(Path(model_dir), staging / "samples", samples, Path(infer_script))
        release = board_release.build_release(entries)
        log.info(
            "release %s: %d files, %.1f MB, %d samples", release.name, len(release.files), release.total_bytes / 1e6, len(samples)
        )
        with connect(target.board) as conn:
            report = board_release.publish(conn, target.remote_dir, target.python, release)
            records, result = run_inference(conn, target, report.release_dir, params, len(samples))
            answers = build_answers(samples, records)
            metrics = build_metrics(target, report, records, answers, result.seconds)
            write_answers(Path(out_dir) / ANSWERS_NAME, answers)
            write_json(metrics_path, metrics)
            failed = [row for row in answers if row["error"]]
            if failed or result.exit_status != 0:
                first = failed[0]["error"] if failed else "none"
                raise RemoteCommandError(
                    conn.host,
                    f"{len(failed)} of {len(answers)} requests failed (first error: {first}); exit status "
                    f"{result.exit_status}. `current` still points to the previous release; see "
                    f"{Path(out_dir) / ANSWERS_NAME} for each answer.",
                    infer_command(report.release_dir, target.python, params),
                    result.stderr,
                    result.exit_status,
                )
            board_release.activate(conn, target.remote_dir, target.python, release.name, params.keep_releases)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "deploy: %d answers, load %.2f s, latency mean %.2f s, p95 %.2f s, %s tokens/s",
        metrics["samples"],
        metrics["load_s"] or float("nan"),
        metrics["latency_s"]["mean"] or float("nan"),
        metrics["latency_s"]["p95"] or float("nan"),
        metrics["tokens_per_s"],
    )
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", type=Path, help="board checkpoint folder (board_export output)")
    parser.add_argument("dataset", nargs="?", type=Path, help="split dataset folder (test/*.parquet)")
    parser.add_argument("output", nargs="?", type=Path, help="folder to write answers.jsonl to")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    parser.add_argument("--metrics", default="metrics/deploy.json", help="metrics file (default: %(default)s)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--rollback", action="store_true", help="switch the board's current release back to previous")
    action.add_argument("--status", action="store_true", help="print the board's current, previous and stored releases")
    args = parser.parse_args(argv)

    try:
        params = load_params(args.params).deploy
        if args.rollback or args.status:
            target = resolve_target(params)
            with connect(target.board) as conn:
                if args.rollback:
                    state = board_release.rollback(conn, target.remote_dir, target.python)
                    log.info("board %s: current is now %s (previous %s)", conn.host, state["current"], state["previous"])
                else:
                    state = board_release.status(conn, target.remote_dir, target.python)
                print(json.dumps(state, indent=2))
            return 0
        if not (args.model and args.dataset and args.output):
            parser.error("MODEL, DATASET and OUTPUT are required unless --rollback or --status is given")
        deploy(params, args.model, args.dataset, args.output, Path(args.metrics))
    except (BoardError, StageError, ParamsError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
