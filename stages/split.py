"""Split the converted samples into train and test sets that share no image and no caption.

Run from the repository root (reads ``params.yaml``: ``split.*`` and
``convert.shard_size``)::

    python -m stages.split data/converted data/dataset

Samples that share an image (same sha256) or a caption (same cleaned text)
are joined into one group, transitively (union-find), and whole groups are
assigned: otherwise the test set would score captions the model has
learned by heart. Groups are shuffled with ``split.seed`` and filled into
test first, then train, each group going to the first set it fits in.

``split.test_size`` and ``split.train_size`` are counts (>= 1) or fractions
of the samples; as in scikit-learn's ``train_test_split``, a test fraction
is rounded up and a train fraction down. ``train_size: 0`` puts every
sample not in test into train. When a count cannot be met exactly, the
stage stops with an error naming the parameter and the number available.

Output in the output folder, rows in input order:
``train/part-NNNNN.parquet``, ``test/part-NNNNN.parquet`` (the converted
columns unchanged), ``dataset_info.json`` (entries ``silu_train`` and
``silu_test``), and counts in ``metrics/split.json``. The same input and
seed give byte-identical files.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from stages.common import StageError, atomic_path, get_logger, write_json
from stages.config import ParamsError, SplitParams, load_params
from stages.parts import RotatingPartWriter, dataset_entry, iter_rows, list_parts

log = get_logger(__name__)

TRAIN, TEST, UNUSED = "train", "test", "unused"


# --------------------------------------------------------------------------- grouping


class UnionFind:
    """Disjoint sets over ``0 .. size-1`` with path halving and union by size."""

    def __init__(self, size: int):
        self.parent = list(range(size))
        self.size = [1] * size

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if self.size[a] < self.size[b]:
            a, b = b, a
        self.parent[b] = a
        self.size[a] += self.size[b]


def group_samples(sha256s: list[str], captions: list[str]) -> list[list[int]]:
    """Return groups of sample indexes joined by a shared sha256 or caption, ordered by first index."""
    sets = UnionFind(len(sha256s))
    first: dict[tuple[str, str], int] = {}
    for index, keys in enumerate(zip(sha256s, captions, strict=True)):
        for kind, key in zip(("sha256", "caption"), keys, strict=True):
            earlier = first.setdefault((kind, key), index)
            sets.union(earlier, index)
    groups: dict[int, list[int]] = {}
    for index in range(len(sha256s)):
        groups.setdefault(sets.find(index), []).append(index)
    return sorted(groups.values(), key=lambda members: members[0])


# --------------------------------------------------------------------------- assignment


@dataclass
class SplitPlan:
    """Assignment of every sample: ``assignment[i]`` is ``train``, ``test`` or ``unused``."""

    assignment: list[str]
    groups: int
    largest_group: int
    counts: dict[str, int] = field(default_factory=dict)


def _samples(count: int, kind: str = "") -> str:
    """Return e.g. "1 test sample" or "3 samples"."""
    noun = "sample" if count == 1 else "samples"
    return f"{count} {kind} {noun}" if kind else f"{count} {noun}"


def requested_counts(available: int, params: SplitParams) -> tuple[int, int | None]:
    """Return ``(test, train)`` sample counts; ``train`` is None for "all the rest".

    Raises StageError when the counts do not fit in ``available`` samples.
    """
    if available < 2:
        raise StageError(
            f"split: {_samples(available)} to split, but a split needs at least 2 (1 test, 1 train). Look in "
            "metrics/download.json, filter.json and convert.json for the step that dropped the rest, for "
            "example `wrong language` when `data.lang` does not match the captions."
        )
    # A tiny tolerance so that e.g. 0.7 * 10 = 7.000000000000001 rounds up to 7, not 8.
    if params.test_size < 1:
        test = math.ceil(params.test_size * available - 1e-9)
    else:
        test = int(params.test_size)
    if params.train_size == 0:
        train = None
    elif params.train_size < 1:
        train = math.floor(params.train_size * available + 1e-9)
    else:
        train = int(params.train_size)

    if train is None and test >= available:
        raise StageError(
            f"split: `split.test_size` = {params.test_size} asks for {_samples(test, 'test')} but only {available} "
            "are available and train needs at least one; lower split.test_size."
        )
    if train == 0:
        raise StageError(
            f"split: `split.train_size` = {params.train_size} gives 0 train samples out of {available}; "
            "raise it or set it to 0 for all samples not in test."
        )
    if train is not None and test + train > available:
        raise StageError(
            f"split: `split.test_size` = {params.test_size} and `split.train_size` = {params.train_size} ask for "
            f"{test} + {train} samples but only {available} are available; lower one of them."
        )
    return test, train


def plan_split(sha256s: list[str], captions: list[str], params: SplitParams) -> SplitPlan:
    """Assign every sample to train, test or unused; raise StageError if the counts cannot be met."""
    available = len(sha256s)
    test_target, train_target = requested_counts(available, params)
    groups = group_samples(sha256s, captions)
    random.Random(params.seed).shuffle(groups)

    assignment = [UNUSED] * available
    counts = {TRAIN: 0, TEST: 0, UNUSED: 0}
    for members in groups:
        if counts[TEST] + len(members) <= test_target:
            target = TEST
        elif train_target is None or counts[TRAIN] + len(members) <= train_target:
            target = TRAIN
        else:
            target = UNUSED
        counts[target] += len(members)
        for index in members:
            assignment[index] = target

    largest = max(len(members) for members in groups)
    groups_word = "group" if len(groups) == 1 else "groups"
    groups_note = (
        f"The {available} samples form {len(groups)} {groups_word} that share an image or caption, "
        f"the largest with {largest} samples."
    )
    if counts[TEST] != test_target:
        raise StageError(
            f"split: `split.test_size` = {params.test_size} asks for {_samples(test_target, 'test')}, but whole groups "
            f"filled only {counts[TEST]}. {groups_note} Change split.test_size or split.seed."
        )
    if train_target is not None and counts[TRAIN] != train_target:
        raise StageError(
            f"split: `split.train_size` = {params.train_size} asks for {_samples(train_target, 'train')}, but whole "
            f"groups filled only {counts[TRAIN]} of the {available - test_target} left after test. {groups_note} "
            "Change split.train_size or split.seed."
        )
    if counts[TRAIN] == 0:
        raise StageError(f"split: no train sample is left after test. {groups_note} Lower split.test_size.")
    return SplitPlan(assignment, len(groups), largest, counts)


# --------------------------------------------------------------------------- stage


def run_split(
    in_dir: str | Path, out_dir: str | Path, params: SplitParams, rows_per_part: int, metrics_path: str | Path
) -> SplitPlan:
    """Split the samples in ``in_dir/samples`` into ``out_dir/train`` and ``out_dir/test``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    parts = list_parts(in_dir / "samples", "convert")

    # The first pass reads only the two key columns, so memory stays small.
    # The second pass below streams whole rows into train and test.
    sha256s: list[str] = []
    captions: list[str] = []
    for row in iter_rows(parts, ["sha256", "caption"]):
        sha256s.append(row["sha256"])
        captions.append(row["caption"])
    plan = plan_split(sha256s, captions, params)
    log.info(
        "split: %d samples in %d groups -> train %d, test %d, unused %d",
        len(sha256s), plan.groups, plan.counts[TRAIN], plan.counts[TEST], plan.counts[UNUSED],
    )

    schema = pq.read_schema(parts[0])
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        writers = {
            TRAIN: RotatingPartWriter(tmp / TRAIN, schema, rows_per_part),
            TEST: RotatingPartWriter(tmp / TEST, schema, rows_per_part),
        }
        for index, row in enumerate(iter_rows(parts)):
            target = plan.assignment[index]
            if target != UNUSED:
                writers[target].add(row)
        for writer in writers.values():
            writer.close()
        write_json(tmp / "dataset_info.json", {"silu_train": dataset_entry(TRAIN), "silu_test": dataset_entry(TEST)})

    write_json(
        metrics_path,
        {
            "records": len(sha256s),
            "train": plan.counts[TRAIN],
            "test": plan.counts[TEST],
            "unused": plan.counts[UNUSED],
            "groups": plan.groups,
            "largest_group": plan.largest_group,
        },
    )
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.split", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="convert output folder (samples/part-NNNNN.parquet)")
    parser.add_argument("output", type=Path, help="folder to write train/, test/ and dataset_info.json to")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--metrics", default="metrics/split.json", help="metrics file (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        run_split(args.input, args.output, params.split, params.convert.shard_size, args.metrics)
    except (ParamsError, StageError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
