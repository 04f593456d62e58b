"""Run a stage in a subprocess whose files may not grow past a size limit, as a full disk would stop it."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_with_file_size_limit(args: list[str], cwd: Path, limit_bytes: int) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` in ``cwd`` with RLIMIT_FSIZE set, so a larger write fails with EFBIG.

    Python ignores SIGXFSZ, so the write raises OSError instead of killing the process.
    """

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        preexec_fn=limit_file_size, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
