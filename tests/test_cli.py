from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def ssltk(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ssltk", *args], cwd=cwd, capture_output=True, text=True, check=False
    )


def test_version():
    result = ssltk("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("ssltk ")


@pytest.mark.parametrize(
    ("tree", "culprit"),
    [
        ({"pretrain": {"epochs": "x"}}, "pretrain.epochs"),
        ({"data": {"bogus": 1}}, "data.bogus"),
        ({"pretrain": {"batch_size": -64}}, "pretrain.batch_size"),
    ],
)
def test_bad_params_exit_2_with_one_line(tmp_path: Path, tree: dict, culprit: str):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    result = ssltk("prepare", "--params", str(params))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert culprit in lines[0] and "Traceback" not in result.stderr


def test_bad_override_exits_2_naming_the_key():
    result = ssltk("prepare", "--set", "data.source=nope")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.source" in lines[0] and "'nope'" in lines[0]


def test_config_prints_resolved_values():
    result = ssltk("config", "--set", "pretrain.epochs=3")
    assert result.returncode == 0
    assert '"epochs": 3' in result.stdout


def test_models_prints_params_and_endpoint_shapes():
    result = ssltk("models", "--set", "model.arch=revnet50", "--set", "model.widening=4")
    assert result.returncode == 0, result.stderr
    assert "pre_logits" in result.stdout and "2048" in result.stdout
    assert "7,457,640" in result.stdout  # RevNet50 k=4 with its 1000-way head (paper §3.1)


def test_models_rejects_an_input_too_small_for_vgg():
    result = ssltk("models", "--set", "model.arch=vgg19_bn", "--input-size", "20")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "input_size=20" in result.stderr
