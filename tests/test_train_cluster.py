"""Pretraining as a cluster runs it: two torchrun processes (gloo, CPU) stopped by SIGTERM to the
torchrun agent, and resumed where only rank 0 can see the run directory (each rank has its own
working directory and a relative ``--out``), end bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from demo_images import demo_imagefolder

from ssltk import store as mlflow_store
from ssltk import tracking
from ssltk.config import load_config
from ssltk.data.prepare import prepare
from ssltk.train.checkpoint import list_checkpoints

STEPS = 10  # 2 epochs of 5 steps at batch 8
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CELL = Path("runs") / "cell"

#: Runs ``python -m ssltk`` in ``<base>/rank<RANK>`` and leaves its exit status there.
RANK_CWD = """
import os, runpy, sys
from pathlib import Path
home = Path(sys.argv.pop(1)) / f"rank{os.environ['RANK']}"
home.mkdir(parents=True, exist_ok=True)
os.chdir(home)
code = 0
try:
    sys.argv[0] = "ssltk"
    runpy.run_module("ssltk", run_name="__main__")
except SystemExit as exit:
    code = exit.code
    raise
finally:
    (home / "exit-code").write_text(str(code))
"""


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cluster")
    config = {
        "seed": 3,
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(root / "images", 4, held_out_split="val")),
            "val_fraction": 0,
            "prepared_dir": str(root / "prepared"),
        },
        "model": {"arch": "resnet50_v1", "widening": 1},
        "pretext": {"task": "rotation", "input_size": 32, "preprocessing": "tf1"},
        "pretrain": {
            "epochs": STEPS // 5,
            "batch_size": 8,
            "warmup_epochs": 0.5,
            "checkpoint_every": 1000,  # only the stop and the end write one
            "log_every": 2,
            "device": "cpu",
        },
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "cluster"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(config))
    prepare(load_config(path), progress=False)
    yield path
    torch.set_num_threads(threads)


def final_sha256(run_dir: Path) -> str:
    sidecar = run_dir / "checkpoints" / f"ckpt-{STEPS:08d}.pt.sha256"
    return sidecar.read_text().split()[0]


def launch(params: Path, out: Path) -> list[str]:
    """``ssltk pretrain`` with two processes: it runs itself under torchrun."""
    two = ["--set", "pretrain.distributed.nproc_per_node=2", "--out", str(out)]
    return [sys.executable, "-m", "ssltk", "pretrain", "--params", str(params), *two]


@pytest.fixture(scope="module")
def reference(params: Path) -> Path:
    """An uninterrupted two-process run."""
    out = params.parent / "reference"
    launched = subprocess.run(
        launch(params, out), env=ENV, capture_output=True, text=True, timeout=600, check=False
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count(f"pretrained {STEPS} steps") == 1  # rank 0 only
    run_id = yaml.safe_load((out / "run.json").read_text())["run_id"]
    run = mlflow_store.client(f"sqlite:///{params.parent / 'mlflow.db'}").get_run(run_id)
    assert run.data.tags[tracking.TAG_WORLD_SIZE] == "2"
    return out


def wait_for_first_window(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 300
    while not (run_dir / "curve.csv").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be signalled"


def test_sigterm_to_torchrun_stops_every_rank_after_one_step_and_resume_is_bit_identical(
    params: Path, reference: Path
):
    root = params.parent
    script = root / "rank_cwd.py"
    script.write_text(textwrap.dedent(RANK_CWD))
    base = root / "ranks"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", str(script), str(base), "pretrain", "--params", str(params)]
    command += ["--out", str(CELL)]
    rank0, rank1 = base / "rank0", base / "rank1"

    agent = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_first_window(agent, rank0 / CELL)
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=120)
    assert (rank0 / "exit-code").read_text() == "130", stderr.decode()[-3000:]
    assert (rank1 / "exit-code").read_text() == "130"
    (stopped, _), *others = list_checkpoints(rank0 / CELL / "checkpoints")
    assert not others and 2 <= stopped < STEPS  # one checkpoint, of the step every rank finished
    assert not list_checkpoints(rank1 / CELL / "checkpoints")
    assert yaml.safe_load((rank0 / CELL / "run.json").read_text())["status"] == "killed"

    resumed = subprocess.run(command, env=ENV, capture_output=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert (rank1 / "exit-code").read_text() == "0"
    assert not list_checkpoints(rank1 / CELL / "checkpoints")  # rank 1 never saw one
    assert final_sha256(rank0 / CELL) == final_sha256(reference)
    assert (rank0 / CELL / "curve.csv").read_text() == (reference / "curve.csv").read_text()


def test_sigterm_to_one_rank_stops_all_and_ssltk_pretrain_exits_130(params: Path, reference: Path):
    out = params.parent / "one-rank"
    launcher = subprocess.Popen(
        launch(params, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wait_for_first_window(launcher, out)
    (rank1,) = [
        p
        for p in psutil.Process(launcher.pid).children(recursive=True)
        if p.environ().get("RANK") == "1" and "ssltk" in " ".join(p.cmdline())
    ]
    rank1.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, stderr.decode()[-3000:]
    (stopped, _), *others = list_checkpoints(out / "checkpoints")
    assert not others and stopped < STEPS
    assert yaml.safe_load((out / "run.json").read_text())["status"] == "killed"

    resumed = subprocess.run(launch(params, out), env=ENV, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert final_sha256(out) == final_sha256(reference)
