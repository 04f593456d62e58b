"""params.yaml validation: unknown keys, wrong types and impossible combinations name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parent.parent


def _params(**sections: dict) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_repo_params_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.data.lang == "ko"
    assert params.train.learning_rate == pytest.approx(1.0e-4)
    assert isinstance(params.train.epochs, float)


def test_defaults_match_params_yaml() -> None:
    # params.yaml spells out every key, so the file and the dataclass defaults must agree.
    from_file = load_params(REPO / "params.yaml")
    assert from_file == parse_params({})


def test_misspelt_key_names_it() -> None:
    raw = _params(train={"epoch": 3})
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert "`train.epoch`" in str(err.value)
    assert "`train.epochs`" in str(err.value)


def test_unknown_section_rejected() -> None:
    raw = _params()
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ParamsError, match="Unknown section `trian`.*`train`"):
        parse_params(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("train", "epochs", "three", "expected a number"),
        ("train", "learning_rate", "1.0e-4x", "expected a number"),
        ("deploy", "remote_dir", "~/silu", "absolute path"),
        ("deploy", "remote_dir", "silu", "absolute path"),
        ("deploy", "python", "~/venv/bin/python", "does not expand"),
        ("train", "lora_rank", 8.5, "expected a whole number"),
        ("train", "freeze_vision_tower", "yes", "expected true or false"),
        ("train", "precision", "fp8", "expected one of"),
        ("data", "lang", "xx", "expected one of"),
        ("download", "workers", 0, "must be >= 1"),
        ("filter", "max_aspect", 250.0, "below 200"),
        ("filter", "background", "white", "#rrggbb"),
        ("split", "test_size", 0, "at least one test sample"),
        ("split", "test_size", 2.5, "whole count"),
        ("deploy", "port", 70000, "1-65535"),
        ("base", "source", "ollama", "expected one of"),
        ("split", "test_size", float("nan"), "finite number"),
        ("split", "train_size", float("inf"), "finite number"),
        ("train", "learning_rate", float("nan"), "finite number"),
        ("download", "read_timeout", float("nan"), "finite number"),
        ("download", "deadline", float("inf"), "finite number"),
        ("deploy", "run_timeout", float("nan"), "finite number"),
        ("filter", "background", "#-12345", "#rrggbb"),
        ("filter", "background", "#ff_fff", "#rrggbb"),
        ("filter", "background", "# fffff", "#rrggbb"),
        ("train", "master_port", 70000, "1-65535"),
        ("train", "master_port", -5, "1-65535"),
        ("train", "lr_scheduler_type", "bogus", "expected one of"),
        ("deploy", "host", "", "is empty"),
    ],
)
def test_bad_value_names_key(section: str, key: str, value: object, fragment: str) -> None:
    with pytest.raises(ParamsError) as err:
        parse_params(_params(**{section: {key: value}}))
    message = str(err.value)
    assert f"`{section}.{key}`" in message
    assert fragment in message


def test_cross_field_rules() -> None:
    with pytest.raises(ParamsError, match="`base.revision`"):
        parse_params(_params(base={"source": "modelscope", "revision": ""}))
    with pytest.raises(ParamsError, match="`convert.image_max_pixels`"):
        parse_params(_params(convert={"image_max_pixels": 1000, "image_min_pixels": 4096}))
    with pytest.raises(ParamsError, match="`deploy.ascend_workarounds`"):
        parse_params(_params(deploy={"ascend_workarounds": True, "device": "CPU"}))
    with pytest.raises(ParamsError, match="`split.test_size` \\+ `split.train_size`"):
        parse_params(_params(split={"test_size": 0.6, "train_size": 0.6}))


def test_cli_reports_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_params(train={"epoch": 3})), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "stages.config", str(bad)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "`train.epoch`" in result.stderr


def test_cli_missing_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stages.config", str(tmp_path / "none.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_empty_image_root_rejected() -> None:
    with pytest.raises(ParamsError, match="`data.image_root` is empty"):
        parse_params(_params(data={"image_root": ""}))


def test_nan_from_yaml_rejected(tmp_path: Path) -> None:
    # YAML's own spellings of NaN and infinity are floats, not strings.
    text = (REPO / "params.yaml").read_text(encoding="utf-8").replace("test_size: 0.2", "test_size: .nan")
    bad = tmp_path / "params.yaml"
    bad.write_text(text, encoding="utf-8")
    with pytest.raises(ParamsError, match="`split.test_size` is nan; expected a finite number"):
        load_params(bad)


def test_unknown_key_names_file_once(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_params(train={"epoch": 3})), encoding="utf-8")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert str(err.value).count("params.yaml") == 1


@pytest.mark.parametrize("text", ["5e-05", "1e-4", "1.0e-5", "+2E+3", ".5"])
def test_exponent_float_strings_accepted(text: str) -> None:
    # `dvc exp run -S train.learning_rate=5e-5` writes 5e-05, which PyYAML reads as a string.
    params = parse_params(_params(train={"learning_rate": text}))
    assert params.train.learning_rate == pytest.approx(float(text))


def test_dvc_written_learning_rate_loads(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text(encoding="utf-8").replace("learning_rate: 1.0e-4", "learning_rate: 5e-05")
    written = tmp_path / "params.yaml"
    written.write_text(text, encoding="utf-8")
    assert load_params(written).train.learning_rate == pytest.approx(5e-05)
