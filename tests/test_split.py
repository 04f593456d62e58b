"""Tests for stages.split: disjoint, covering, seed-fixed train/test sets and their count rules."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from stages.common import StageError
from stages.config import SplitParams
from stages.convert import SAMPLE_SCHEMA
from stages.split import group_samples, main, plan_split, requested_counts, run_split
from tests.file_limit import run_with_file_size_limit


def sample(line: int, image_key: Any, caption: str) -> dict[str, Any]:
    """Return one converted sample whose image hash is derived from ``image_key``."""
    return {
        "messages": [
            {"role": "user", "content": "<image>이 이미지를 설명해 주세요."},
            {"role": "assistant", "content": caption},
        ],
        "images": [{"bytes": f"jpeg {image_key}".encode(), "path": f"id{line:04d}.jpg"}],
        "img_id": f"id{line:04d}",
        "line": line,
        "caption": caption,
        "sha256": f"sha-{image_key}",
        "tokens": 100 + line,
    }


def write_converted(folder: Path, samples: list[dict[str, Any]], rows_per_part: int = 1000) -> Path:
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    for start in range(0, len(samples), rows_per_part):
        table = pa.Table.from_pylist(samples[start : start + rows_per_part], schema=SAMPLE_SCHEMA)
        pq.write_table(table, folder / "samples" / f"part-{start // rows_per_part:05d}.parquet")
    return folder


def read_split(folder: Path, name: str) -> list[dict[str, Any]]:
    rows = []
    for part in sorted((folder / name).glob("part-*.parquet")):
        rows.extend(pq.read_table(part).to_pylist())
    return rows


def singletons(count: int) -> list[dict[str, Any]]:
    return [sample(line, line, f"캡션 {line}") for line in range(1, count + 1)]


# --------------------------------------------------------------------------- properties

@st.composite
def split_cases(draw: st.DrawFn) -> tuple[list[tuple[int, int]], SplitParams]:
    """Draw (image key, caption key) pairs, with some keys shared, and split params that mostly fit them."""
    spread = draw(st.sampled_from([5, 20, 80]))
    keys = draw(st.lists(st.tuples(st.integers(0, spread), st.integers(0, spread)), min_size=2, max_size=40))
    count = len(keys)
    test_size = draw(st.one_of(st.integers(1, count - 1).map(float), st.floats(0.01, 0.99)))
    room = count - (test_size if test_size >= 1 else 1)
    train_size = draw(st.one_of(st.just(0.0), st.integers(1, max(1, int(room))).map(float), st.floats(0.01, 0.99)))
    assume(not (0 < test_size < 1 and 0 < train_size < 1 and test_size + train_size > 1))
    return keys, SplitParams(test_size=test_size, train_size=train_size, seed=draw(st.integers(0, 2**32)))


@settings(max_examples=300, deadline=None)
@given(case=split_cases())
def test_plan_disjoint_and_covering(case: tuple[list[tuple[int, int]], SplitParams]) -> None:
    keys, params = case
    sha256s = [f"sha-{image}" for image, _ in keys]
    captions = [f"caption {text}" for _, text in keys]
    try:
        plan = plan_split(sha256s, captions, params)
    except StageError as exc:
        assert "split." in str(exc)
        event("counts cannot be met")
        return
    event("split made")

    by_set: dict[str, list[int]] = {"train": [], "test": [], "unused": []}
    for index, target in enumerate(plan.assignment):
        by_set[target].append(index)
    for kind in (sha256s, captions):
        assert not {kind[i] for i in by_set["train"]} & {kind[i] for i in by_set["test"]}
    assert sorted(sum(by_set.values(), [])) == list(range(len(keys)))
    assert {name: len(members) for name, members in by_set.items()} == plan.counts

    test_target, train_target = requested_counts(len(keys), params)
    assert plan.counts["test"] == test_target
    assert plan.counts["train"] >= 1
    if train_target is None:
        assert plan.counts["unused"] == 0
    else:
        assert plan.counts["train"] == train_target
    assert plan_split(sha256s, captions, params).assignment == plan.assignment


@settings(max_examples=25, deadline=None)
@given(keys=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), min_size=4, max_size=30), seed=st.integers(0, 99))
def test_split_files_disjoint_and_fixed(keys: list, seed: int) -> None:
    samples = [sample(line, image, f"캡션 {text}") for line, (image, text) in enumerate(keys, 1)]
    params = SplitParams(test_size=0.25, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_converted(Path(tmp) / "converted", samples, rows_per_part=7)
        try:
            run_split(root, Path(tmp) / "a", params, 5, Path(tmp) / "a.json")
        except StageError as exc:
            assert "split.test_size" in str(exc)
            event("counts cannot be met")
            return
        event("split made")
        run_split(root, Path(tmp) / "b", params, 5, Path(tmp) / "b.json")

        train, test = read_split(Path(tmp) / "a", "train"), read_split(Path(tmp) / "a", "test")
        assert not {r["sha256"] for r in train} & {r["sha256"] for r in test}
        assert not {r["caption"] for r in train} & {r["caption"] for r in test}
        assert sorted(r["line"] for r in train + test) == [s["line"] for s in samples]
        assert [r["line"] for r in train] == sorted(r["line"] for r in train)
        by_line = {s["line"]: s for s in samples}
        assert all(row == by_line[row["line"]] for row in train + test)

        files_a = sorted(p.relative_to(Path(tmp) / "a") for p in (Path(tmp) / "a").rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(Path(tmp) / "b") for p in (Path(tmp) / "b").rglob("*") if p.is_file())
        assert files_a == files_b
        for name in files_a:
            assert (Path(tmp) / "a" / name).read_bytes() == (Path(tmp) / "b" / name).read_bytes(), name


# --------------------------------------------------------------------------- grouping and counts


def test_groups_join_transitively() -> None:
    # 0-1 share an image, 1-2 a caption, 4 shares 0's caption, and 3 shares nothing.
    sha256s = ["a", "a", "b", "c", "d"]
    captions = ["x", "y", "y", "z", "x"]
    assert group_samples(sha256s, captions) == [[0, 1, 2, 4], [3]]


@pytest.mark.parametrize(
    "available,test_size,train_size,expected",
    [
        (10, 2, 3, (2, 3)),
        (10, 0.3, 0.7, (3, 7)),
        (10, 0.25, 0.5, (3, 5)),
        (10, 0.2, 0, (2, None)),
        (3, 0.01, 0, (1, None)),
        (10, 9, 0, (9, None)),
        (10, 4, 6, (4, 6)),
    ],
)
def test_requested_counts(available: int, test_size: float, train_size: float, expected: tuple) -> None:
    params = SplitParams(test_size=test_size, train_size=train_size)
    assert requested_counts(available, params) == expected


@pytest.mark.parametrize(
    "available,test_size,train_size,message",
    [
        (0, 0.2, 0, r"0 samples to split, but a split needs at least 2 \(1 test, 1 train\)"),
        (1, 0.2, 0, r"1 sample to split, but a split needs at least 2 .*metrics/download.json.*`data.lang`"),
        (1, 1, 0, r"1 sample to split"),
        (2, 2, 0, r"`split.test_size` = 2 asks for 2 test samples but only 2 are available"),
        (5, 0.9, 0, r"asks for 5 test samples"),
        (10, 10, 0, r"`split.test_size` = 10 asks for 10 test samples but only 10 are available"),
        (10, 4, 7, r"ask for 4 \+ 7 samples but only 10 are available"),
        (10, 0.5, 0.05, r"`split.train_size` = 0.05 gives 0 train samples out of 10"),
    ],
)
def test_requested_counts_rejected(available: int, test_size: float, train_size: float, message: str) -> None:
    with pytest.raises(StageError, match=message):
        requested_counts(available, SplitParams(test_size=test_size, train_size=train_size))


def test_count_split_leaves_rest_unused() -> None:
    keys = [f"k{i}" for i in range(10)]
    plan = plan_split(keys, keys, SplitParams(test_size=2, train_size=3, seed=1))
    assert plan.counts == {"train": 3, "test": 2, "unused": 5}


def test_groups_too_large_for_test_raise() -> None:
    # Four samples with one caption form one group of four: no test set of 1.
    with pytest.raises(StageError, match=r"asks for 1 test sample, but whole groups filled only 0\.") as info:
        plan_split(["a", "b", "c", "d"], ["same"] * 4, SplitParams(test_size=1))
    assert "The 4 samples form 1 group that share an image or caption, the largest with 4 samples." in str(
        info.value
    )


def test_groups_too_large_for_train_raise() -> None:
    # Line 0 goes to test; the other four share a caption and cannot make 3.
    message = r"`split.train_size` = 3 asks for 3 train samples, but whole groups filled only 0 of the 4 left"
    with pytest.raises(StageError, match=message):
        plan_split(["a", "b", "c", "d", "e"], ["t", "u", "u", "u", "u"], SplitParams(test_size=1, train_size=3))


def test_seed_changes_assignment() -> None:
    keys = [f"k{i}" for i in range(50)]
    first = plan_split(keys, keys, SplitParams(test_size=10, seed=1)).assignment
    assert first == plan_split(keys, keys, SplitParams(test_size=10, seed=1)).assignment
    assert first != plan_split(keys, keys, SplitParams(test_size=10, seed=2)).assignment


# --------------------------------------------------------------------------- stage output


def test_outputs_and_metrics(tmp_path: Path) -> None:
    samples = singletons(8)
    samples.append(sample(9, 1, "캡션 9"))  # same image as line 1
    write_converted(tmp_path / "converted", samples, rows_per_part=4)
    run_split(tmp_path / "converted", tmp_path / "dataset", SplitParams(test_size=2, seed=3), 3, tmp_path / "m.json")

    info = json.loads((tmp_path / "dataset" / "dataset_info.json").read_text())
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    columns = {"messages": "messages", "images": "images"}
    assert info == {
        "silu_train": {"file_name": "train", "formatting": "sharegpt", "columns": columns, "tags": tags},
        "silu_test": {"file_name": "test", "formatting": "sharegpt", "columns": columns, "tags": tags},
    }
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics == {"records": 9, "train": 7, "test": 2, "unused": 0, "groups": 8, "largest_group": 2}

    train = read_split(tmp_path / "dataset", "train")
    test = read_split(tmp_path / "dataset", "test")
    assert len(train) + len(test) == metrics["records"]
    train_lines = {r["line"] for r in train}
    assert (1 in train_lines) == (9 in train_lines)
    assert [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "dataset" / "train").glob("*.parquet"))] == [
        3, 3, 1,
    ]
    assert pq.read_schema(sorted((tmp_path / "dataset" / "test").glob("*.parquet"))[0]).equals(SAMPLE_SCHEMA)


def test_missing_input_names_convert(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"run the convert stage first"):
        run_split(tmp_path / "nothing", tmp_path / "out", SplitParams(), 10, tmp_path / "m.json")
    (tmp_path / "converted").mkdir()
    (tmp_path / "converted" / "samples").write_text("")
    with pytest.raises(StageError, match=r"samples: is a file, not the convert stage's output folder"):
        run_split(tmp_path / "converted", tmp_path / "out", SplitParams(), 10, tmp_path / "m.json")


def test_main_reads_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_converted(tmp_path / "converted", singletons(6))
    (tmp_path / "params.yaml").write_text("split:\n  test_size: 2\n  seed: 5\nconvert:\n  shard_size: 2\n")
    monkeypatch.chdir(tmp_path)
    assert main(["converted", "dataset"]) == 0
    assert len(list((tmp_path / "dataset" / "train").glob("part-*.parquet"))) == 2
    assert json.loads((tmp_path / "metrics" / "split.json").read_text())["test"] == 2

    (tmp_path / "params.yaml").write_text("split:\n  test_size: 6\n")
    assert main(["converted", "dataset2"]) == 1
    assert not (tmp_path / "dataset2").exists()


def test_failed_write_names_part(tmp_path: Path) -> None:
    samples = singletons(10)
    for row in samples:
        row["images"][0]["bytes"] = random.Random(row["line"]).randbytes(20_000)
    write_converted(tmp_path / "converted", samples)
    (tmp_path / "params.yaml").write_text("split:\n  test_size: 2\n")

    # Eight train rows of 20 KB make a part of about 160 KB, above the 100 KB limit.
    result = run_with_file_size_limit(["-m", "stages.split", "converted", "dataset"], tmp_path, 100 * 1024)

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "cannot write dataset/train/part-00000.parquet: File too large; the file size" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "params.yaml"]
