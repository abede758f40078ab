from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ssltk.config import Config, arch_names, dump_config, load_config, parse_override, task_names
from ssltk.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_project_params_file_is_valid_and_complete():
    config = load_config(ROOT / "params.yaml")
    assert config.data.source == "demo"
    assert set(config.study.tasks) <= set(task_names())
    assert set(config.study.archs) <= set(arch_names())


def test_schema_defaults_follow_the_paper():
    config = Config()
    assert config.pretrain.epochs == 35
    assert config.pretrain.decay_epochs == [15, 25]
    assert config.pretrain.warmup_epochs == 5
    assert config.pretrain.weight_decay == 1e-4
    assert config.pretext.exemplar.copies == 8 and config.pretext.exemplar.margin == 0.5
    assert config.pretext.jigsaw.perm_subset == 8 and config.pretext.jigsaw.weight_decay == 5e-4
    assert config.eval.pooling == "max" and config.eval.max_features == 9000


@pytest.mark.parametrize(
    ("tree", "culprit"),
    [
        ({"pretrain": {"epochs": "many"}}, "pretrain.epochs"),
        ({"pretrain": {"epochs": -3}}, "pretrain.epochs"),
        ({"pretrain": {"epoch": 3}}, "pretrain.epoch"),
        ({"data": {"source": "nope"}}, "data.source"),
        ({"nonsense": 1}, "nonsense"),
        ({"model": {"arch": "resnet50_v1", "last_relu": False}}, "last_relu"),
        ({"pretrain": {"decay_epochs": [25, 15]}}, "pretrain.decay_epochs"),
        ({"pretext": {"exemplar": {"grayscale_p": 1.5}}}, "pretext.exemplar.grayscale_p"),
        ({"pretext": {"task": "exemplar"}, "pretrain": {"batch_size": 1}}, "pretrain.batch_size"),
    ],
)
def test_bad_params_file_names_the_key(tmp_path: Path, tree: dict, culprit: str):
    path = write(tmp_path, tree)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert culprit in message and str(path) in message
    assert "\n" not in message


def test_overrides_are_validated_by_the_same_schema(tmp_path: Path):
    path = write(tmp_path, {"pretrain": {"epochs": 3}})
    config = load_config(
        path, ["pretrain.epochs=7", "model.arch=revnet50", "study.widenings=[4, 8]"]
    )
    assert config.pretrain.epochs == 7
    assert config.model.arch == "revnet50"
    assert config.study.widenings == [4, 8]
    with pytest.raises(UserError, match=r"pretrain\.epochs"):
        load_config(path, ["pretrain.epochs=-1"])
    with pytest.raises(UserError, match=r"unknown key 'pretrain\.nope'"):
        load_config(path, ["pretrain.nope=1"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(path, ["pretrain.epochs"])
    with pytest.raises(UserError, match="not a section"):
        load_config(path, ["pretrain.epochs.x=1"])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(listy)


def test_dump_round_trips(tmp_path: Path):
    config = load_config(ROOT / "params.yaml", ["pretrain.epochs=2"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path).model_dump() == config.model_dump()  # stores differ: other project


def test_tracking_uri_is_absolute(tmp_path: Path):
    config = load_config(None, ["tracking.uri=sqlite:///rel/store.db"])
    uri = config.tracking.resolved_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/rel/store.db"
    assert Config().tracking.resolved_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


@given(st.integers(min_value=-(2**31), max_value=2**31), st.booleans(), st.floats(allow_nan=False))
def test_override_values_are_read_as_yaml(number: int, flag: bool, real: float):
    assert parse_override(f"a.b={number}") == (["a", "b"], number)
    assert parse_override(f"a={str(flag).lower()}") == (["a"], flag)
    key, value = parse_override(f"x.y={real!r}")
    assert key == ["x", "y"]
    assert value == pytest.approx(real) or str(value) == repr(real)


def test_paper_scale_params_are_valid_and_keep_the_paper_schedule():
    config = load_config(ROOT / "params-imagenet.yaml")
    assert config.data.source == "imagefolder" and config.pretext.input_size == 224
    assert (config.pretrain.epochs, config.pretrain.warmup_epochs) == (35, 5)
    assert config.pretrain.decay_epochs == [15, 25]
    assert config.study.widenings == [4, 8, 12, 16]
