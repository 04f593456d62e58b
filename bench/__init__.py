"""Benchmarks of the pipeline stages: plain scripts that print numbers, not timed tests.

``python -m bench`` lists and runs them (bench/__main__.py); each one also
runs alone as ``python -m bench.<name>``, with ``--help`` for its options.
"""
