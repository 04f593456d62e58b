"""Upload a model folder to the board stand-in with the deploy code and with scp, in one run, and compare.

Run (needs ``.venv-board`` and OpenSSH's sshd, as ``make board`` does)::

    .venv/bin/python -m bench.deploy_upload                 # 1 GiB model, 3 runs each
    .venv/bin/python -m bench.deploy_upload --size-mib 256 --runs 1

The script starts its own stand-in sshd (``tools/board_standin.py``) on a
free 127.0.0.1 port with its state in a temporary folder, and writes a model
folder of random bytes: one ``model.safetensors`` of ``--size-mib`` MiB plus
small config files. It then measures, with runs interleaved (ours, scp, scp
with AES-GCM, ours, ...) so load from other work falls on all of them:

- ours: connect, open SFTP and send the shard with ``stages.board_ssh``
  (pipelined 255 KiB writes, AES-GCM), the same code path ``publish`` uses;
- scp: OpenSSH's ``scp`` of the same shard (its default cipher), and
  ``scp -c aes128-gcm@openssh.com``; both include their handshake too;
- a full first publish (probe, upload, hashing on the board, assemble) and a
  no-change redeploy of the same release (probe plus hashing on the board);
- a resumed upload: a publish in a child process is killed with SIGKILL
  halfway through the shard, and a second publish must send only the rest.

It prints MB/s (10^6 bytes per second) per method (the median over runs), the
client's CPU seconds per GiB, the ratio of ours to scp, the redeploy time, and
the resume check. Client CPU changes less than MB/s when other work shares the
machine, because the sshd end competes for the same cores. The goal is a
ratio of at least 1.0 and a redeploy under 1 s plus hashing. Both ends run
on this machine, so the figures measure CPU cost (ciphers, Python), not a
network. The board's own link and SD card will be slower.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages import board_release  # noqa: E402
from stages.board_ssh import BoardTarget, connect, upload_file  # noqa: E402
from tools import board_standin  # noqa: E402

BOARD_PYTHON = ROOT / ".venv-board" / "bin" / "python"
CHUNK = 16 << 20

# Child process for the resume check: publish the release, to be killed halfway.
_PUBLISH = r"""
import json, sys
from pathlib import Path
from stages import board_release, board_ssh
args = json.loads(sys.argv[1])
target = board_ssh.BoardTarget(args["host"], args["port"], args["user"], args["key_file"], Path(args["known_hosts"]))
release = board_release.build_release({k: Path(v) for k, v in args["entries"].items()})
with board_ssh.connect(target) as conn:
    board_release.publish(conn, args["remote_dir"], args["python"], release, progress=False)
"""


def write_model(folder: Path, size_mib: int) -> dict[str, Path]:
    """Write a fake model folder (random shard + small JSON files); return it as release entries."""
    folder.mkdir(parents=True)
    with (folder / "model.safetensors").open("wb") as handle:
        left = size_mib << 20
        while left:
            block = os.urandom(min(CHUNK, left))
            handle.write(block)
            left -= len(block)
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        (folder / name).write_text(json.dumps({"name": name}))
    return board_release.directory_entries(folder, "model")


def target_of(standin: board_standin.Standin) -> BoardTarget:
    return BoardTarget(standin.host, standin.port, standin.user, standin.key_file, Path(standin.known_hosts))


def time_ours(standin: board_standin.Standin, shard: Path, remote: str) -> tuple[float, float]:
    """Return wall seconds and this process's CPU seconds (all threads) for one upload."""
    started = time.monotonic()
    cpu_started = time.process_time()
    with connect(target_of(standin)) as conn:
        sftp = conn.open_sftp()
        upload_file(conn, sftp, shard, remote, 0)
        sftp.close()
    return time.monotonic() - started, time.process_time() - cpu_started


def time_scp(standin: board_standin.Standin, shard: Path, remote: str, cipher: str | None) -> tuple[float, float]:
    """Return wall seconds and scp's CPU seconds (user + system) for one upload."""
    command = [
        "scp", "-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={standin.known_hosts}", "-i", standin.key_file, "-P", str(standin.port),
    ]  # fmt: skip
    if cipher:
        command += ["-c", cipher]
    command += [str(shard), f"{standin.user}@{standin.host}:{remote}"]
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.monotonic() - started, cpu


def remove_remote(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def measure_transfers(
    standin: board_standin.Standin, shard: Path, runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Return wall seconds and client CPU seconds per method, one entry per run."""
    root = Path(standin.remote_dir)
    methods = {
        "ours (paramiko, pipelined, aes128-gcm)": lambda dest: time_ours(standin, shard, dest),
        "scp (default cipher)": lambda dest: time_scp(standin, shard, dest, None),
        "scp -c aes128-gcm@openssh.com": lambda dest: time_scp(standin, shard, dest, "aes128-gcm@openssh.com"),
    }
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for run in range(runs):
        # Alternate the order so a slow period on the machine does not always hit the same method.
        for name in order if run % 2 == 0 else reversed(order):
            dest = root / f"bench-{run}.bin"
            wall, used = methods[name](str(dest))
            seconds[name].append(wall)
            cpu[name].append(used)
            remove_remote(dest)
    return seconds, cpu


def measure_publish(standin: board_standin.Standin, entries: dict[str, Path]) -> dict[str, float]:
    started = time.monotonic()
    release = board_release.build_release(entries)
    local_hash_s = time.monotonic() - started
    remote_dir = str(Path(standin.remote_dir) / "publish")
    with connect(target_of(standin)) as conn:
        first = board_release.publish(conn, remote_dir, standin.python, release, progress=False)
        board_release.activate(conn, remote_dir, standin.python, release.name, 1)
        again_started = time.monotonic()
        again = board_release.publish(conn, remote_dir, standin.python, release, progress=False)
        board_release.activate(conn, remote_dir, standin.python, release.name, 1)
        again_s = time.monotonic() - again_started
    remove_remote(Path(remote_dir))
    assert again.bytes_sent == 0, f"no-change redeploy sent {again.bytes_sent} bytes"
    return {
        "local_hash_s": local_hash_s,
        "first_publish_s": first.total_s,
        "first_upload_mb_per_s": first.upload_mb_per_s,
        "first_verify_s": first.verify_s,
        "redeploy_s": again_s,
        "redeploy_verify_s": again.verify_s,
    }


def measure_resume(standin: board_standin.Standin, entries: dict[str, Path]) -> dict[str, float]:
    remote_dir = Path(standin.remote_dir) / "resume"
    release = board_release.build_release(entries)
    shard = entries["model/model.safetensors"]
    sha = next(f.sha256 for f in release.files if f.path == "model/model.safetensors")
    part = remote_dir / "objects" / f"{sha}.part"

    args = {
        "host": standin.host,
        "port": standin.port,
        "user": standin.user,
        "key_file": standin.key_file,
        "known_hosts": standin.known_hosts,
        "remote_dir": str(remote_dir),
        "python": standin.python,
        "entries": {k: str(v) for k, v in entries.items()},
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _PUBLISH, json.dumps(args)], cwd=ROOT, env=env)
    half = shard.stat().st_size // 2
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None:
        if part.exists() and part.stat().st_size >= half:
            break
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done = part.stat().st_size if part.exists() else 0

    with connect(target_of(standin)) as conn:
        report = board_release.publish(conn, str(remote_dir), standin.python, release, progress=False)
    remove_remote(remote_dir)

    return {
        "killed_at_bytes": done,
        "resumed_bytes": report.resumed_bytes,
        "sent_after_resume": report.bytes_sent,
        "shard_bytes": shard.stat().st_size,
        # The board may still write what it had received when the child died, so the remainder
        # is counted from the size the second publish found, not from the size seen at the kill.
        # The small files come after the shard, so the child had not sent them.
        "only_remainder_sent": report.resumed_bytes > 0 and report.bytes_sent == release.total_bytes - report.resumed_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy_upload", description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the model shard, MiB (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs per transfer method (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if not BOARD_PYTHON.exists():
        print(f"error: {BOARD_PYTHON} not found; build it with `make install-board`.", file=sys.stderr)
        return 1

    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    state = work / "standin"
    try:
        standin = board_standin.start(state, board_standin.free_port(), BOARD_PYTHON)
        entries = write_model(work / "model", args.size_mib)
        shard = entries["model/model.safetensors"]
        size_mb = shard.stat().st_size / 1e6

        load_before = os.getloadavg()[0]
        seconds, cpu = measure_transfers(standin, shard, args.runs)
        publish = measure_publish(standin, entries)
        resume = measure_resume(standin, entries)
    finally:
        board_standin.stop(state)
        shutil.rmtree(work, ignore_errors=True)

    rates = {name: size_mb / statistics.median(values) for name, values in seconds.items()}
    ours_name = next(iter(rates))
    print(
        f"shard {args.size_mib} MiB, {args.runs} runs each, {os.cpu_count()} CPUs, both ends on 127.0.0.1, "
        f"1-min load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after"
    )
    for name, rate in rates.items():
        runs_text = ", ".join(f"{value:.2f}" for value in seconds[name])
        cpu_per_gib = statistics.median(cpu[name]) / (args.size_mib / 1024)
        print(f"  {name:42s} {rate:7.1f} MB/s  client CPU {cpu_per_gib:4.2f} s/GiB  (wall {runs_text} s)")
    for name, rate in list(rates.items())[1:]:
        print(f"  ratio ours / {name}: {rates[ours_name] / rate:.2f}")
    print(
        f"publish: local hash {publish['local_hash_s']:.2f} s, first publish {publish['first_publish_s']:.2f} s "
        f"(upload {publish['first_upload_mb_per_s']:.1f} MB/s, board hashing {publish['first_verify_s']:.2f} s)"
    )
    print(
        f"no-change redeploy: {publish['redeploy_s']:.2f} s, of which board hashing {publish['redeploy_verify_s']:.2f} s "
        "(local hashing not included)"
    )
    print(
        f"resume: killed at {resume['killed_at_bytes'] / 1e6:.1f} MB, resumed from {resume['resumed_bytes'] / 1e6:.1f} MB, "
        f"then sent {resume['sent_after_resume'] / 1e6:.1f} MB (shard {resume['shard_bytes'] / 1e6:.1f} MB plus small files); "
        f"only the remainder sent: {resume['only_remainder_sent']}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"seconds": seconds, "client_cpu_s": cpu, "mb_per_s": rates, "publish": publish, "resume": resume},
                indent=2,
            )
            + "\n"
        )
    return 0 if resume["only_remainder_sent"] else 1


if __name__ == "__main__":
    sys.exit(main())
