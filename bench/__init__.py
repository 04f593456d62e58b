"""Benchmarks of the pipeline stages: plain scripts that print numbers, not timed tests.

``python -m bench`` lists and runs them (bench/__main__.py); each one also
runs alone as ``python -m bench.<name>``, with ``--help`` for its options.
"""

import signal


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


# Python's default SIGTERM handler exits without running `finally` blocks, so a
# benchmark stopped by `timeout` or `kill` would leave its HTTP server or sshd
# stand-in running. Raising SystemExit runs their cleanup.
signal.signal(signal.SIGTERM, _exit_on_sigterm)
