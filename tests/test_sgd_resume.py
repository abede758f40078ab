"""The SGD probe stopped by SIGTERM (exit 130, a checkpoint) and rerun ends with the figures of
an uninterrupted run: real processes, a real signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from demo_images import demo_imagefolder

from ssltk.config import load_config
from ssltk.data.prepare import prepare


def _eval(params: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "ssltk", "eval", "--params", str(params), "--baseline"]
    return subprocess.Popen(
        [*command, "--out", str(out)],
        cwd=params.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def test_a_sigterm_checkpoints_the_sgd_probe_and_the_rerun_ends_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    params = {
        "seed": 5,
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(tmp_path / "images", 20, 10)),
            "val_fraction": 0.1,
            "prepared_dir": str(tmp_path / "prepared"),
        },
        "model": {"arch": "resnet50_v1", "widening": 1},
        "pretext": {"task": "rotation", "input_size": 32},
        "eval": {
            "layers": ["pre_logits"],
            "method": "mlp",  # dropout: the resumed run must restore its random stream too
            "mlp": {"epochs": 12, "batch_size": 16, "augment": False, "decay_epochs": [8]},
        },
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "resume"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    prepare(load_config(path), progress=False)

    whole = _eval(path, tmp_path / "whole")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    stopped = _eval(path, tmp_path / "stopped")
    lines = []
    assert stopped.stderr is not None
    for line in stopped.stderr:
        lines.append(line)
        if "epoch 3/12" in line:
            time.sleep(0.05)  # mid-epoch, most likely
            stopped.send_signal(signal.SIGTERM)
            break
    rest = stopped.communicate(timeout=120)[1]
    assert stopped.returncode == 130, "".join(lines) + rest
    assert (tmp_path / "stopped" / "probe-mlp.ckpt").is_file()
    assert not (tmp_path / "stopped" / "metrics.json").exists()

    again = _eval(path, tmp_path / "stopped")
    log = again.communicate(timeout=300)[1]
    assert again.returncode == 0, log
    assert "epoch 1/12" not in log  # resumed, not restarted
    figures = [
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "stopped")
    ]
    assert figures[0]["layers"] == figures[1]["layers"]
    assert not (tmp_path / "stopped" / "probe-mlp.ckpt").exists()
