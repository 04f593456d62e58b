"""List or run the benchmarks in bench/, each in its own process.

    python -m bench                 # run every benchmark with its defaults
    python -m bench --list          # list them
    python -m bench NAME [ARGS...]  # run one, passing ARGS to it

A benchmark is any module of this package except the helpers in HELPERS.
``python -m bench`` runs them one after another and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import pkgutil
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# Modules that other benchmarks import; they are not benchmarks themselves.
HELPERS = {"__main__", "http_corpus", "measure"}


def find_benchmarks() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules([str(PACKAGE)]) if info.name not in HELPERS)


def first_line(name: str) -> str:
    """Return the first docstring line of a benchmark module without importing it."""
    text = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
    for quote in ('"""', "'''"):
        if quote in text:
            return text.split(quote, 2)[1].strip().splitlines()[0]
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("name", nargs="?", help="run only this benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options passed to that benchmark")
    args = parser.parse_args(argv)

    benchmarks = find_benchmarks()
    if args.list:
        for name in benchmarks:
            print(f"{name:28s} {first_line(name)}")
        return 0
    if args.name and args.name not in benchmarks:
        print(f"error: no benchmark named {args.name!r}; choose one of {', '.join(benchmarks)}", file=sys.stderr)
        return 2

    failed = []
    for name in [args.name] if args.name else benchmarks:
        print(f"\n=== bench.{name}", flush=True)
        command = [sys.executable, "-m", f"bench.{name}", *(args.args if args.name else [])]
        if subprocess.run(command, cwd=PACKAGE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"error: failed benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
