"""Faults seen as processes: exit codes, the lines printed, what is left on disk and in MLflow.

Interrupts at random moments of a first run's start-up (the store stays usable, the resumed run is
bit-identical), four first runs on one fresh store, two runs on one directory, SIGKILL and resume,
a full disk, an unreachable tracking server, Ctrl-C while importing.

``ssltk pretrain`` processes are forked from a warm interpreter (this file run as a script: a tiny
fork server) so that each costs its work, not 3-5 s of imports; the forked child runs the real
command line (``ssltk.cli.app``) and exits with its exit code. Only the Ctrl-C-while-importing test
starts a cold ``python -m ssltk``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import Workspace, make_workspace, one_error

ROOT = Path(__file__).resolve().parents[1]
#: This checkout's ssltk (not another installed one), one intra-op thread per process (several
#: share two cores).
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    "OMP_NUM_THREADS": "1",
}


# --------------------------------------------------------------------------------------------------
# The fork server (runs in its own process; never imported state from pytest)


def _serve() -> None:
    """Requests on stdin, one JSON line each: ``start`` forks a command line, ``poll`` reports
    whether a child ended (its exit code, negative for a signal); a reply line for each."""
    import torch  # noqa: F401  (warm: these imports are what a fork saves)

    import ssltk.cli
    import ssltk.train.engine  # noqa: F401
    from ssltk import store as mlflow_store

    mlflow_store.quiet_mlflow()
    entry = _entry()
    # Children start with SIGINT/SIGTERM blocked and unblock them once they handle them as
    # ``python -m ssltk`` does from its first line: a signal is never lost in the fork's set-up.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            pid = os.fork()
            if pid == 0:
                _child(request, entry)
            reply = {"pid": pid}
        else:
            done, status = os.waitpid(request["pid"], os.WNOHANG)
            reply = {"code": os.waitstatus_to_exitcode(status) if done else None}
        print(json.dumps(reply), flush=True)


def _entry() -> object | None:
    """``ssltk.__main__`` if it has a ``main()`` (at a77bf00 importing it ran the CLI)."""
    import importlib

    import ssltk

    source = (Path(ssltk.__file__).parent / "__main__.py").read_text()
    return importlib.import_module("ssltk.__main__") if "def main(" in source else None


def _child(request: dict, entry: object | None) -> None:

    code = 1
    try:
        os.setpgid(0, 0)  # signals meant for the server never reach a child, and vice versa
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(request.get("env", {}))
        sys.argv = ["ssltk", *request["argv"]]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if entry is not None:  # what main()'s first lines do
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, entry.interrupt)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:  # as during ``python -m ssltk``'s imports
            sys.stderr.write("error: interrupted\n")
            code = 130
            return
        if entry is not None:
            entry.main()
        else:
            from ssltk.cli import app

            app(prog_name="ssltk")
        code = 0
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --------------------------------------------------------------------------------------------------
# The test side


class Forker:
    """Starts ``ssltk`` command lines as forks of the warm server (a child of ours)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0
        self.server = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=ENV,
            text=True,
        )

    def ask(self, **request: object) -> dict:
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        return json.loads(self.server.stdout.readline())

    def start(self, *argv: str, env: dict | None = None) -> Proc:
        self.count += 1
        log = self.logs / f"proc-{self.count}.log"
        reply = self.ask(op="start", argv=list(argv), log=str(log), env=env or {})
        return Proc(self, reply["pid"], log)

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


class Proc:
    def __init__(self, forker: Forker, pid: int, log: Path) -> None:
        self.forker, self.pid, self.log = forker, pid, log
        self.code: int | None = None

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def poll(self) -> int | None:
        if self.code is None:
            self.code = self.forker.ask(op="poll", pid=self.pid)["code"]
        return self.code

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.signal(signal.SIGKILL)
                while self.poll() is None:
                    time.sleep(0.01)
                pytest.fail(f"ssltk still running after {timeout} s:\n{self.output}")
            time.sleep(0.01)
        return self.code

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def stderr(self) -> str:
        """What the process printed (stdout and stderr share the log)."""
        return self.output


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("rely-proc"))


@pytest.fixture(scope="module")
def forker(tmp_path_factory: pytest.TempPathFactory):
    server = Forker(tmp_path_factory.mktemp("logs"))
    yield server
    server.close()


def pretrain_argv(ws: Workspace, out: Path, *sets: str, store: Path | None = None) -> list[str]:
    overrides = list(sets)
    if store is not None:
        overrides.append(f"tracking.uri=sqlite:///{store}")
    argv = ["pretrain", "--params", str(ws.params), "--out", str(out)]
    return argv + [arg for item in overrides for arg in ("--set", item)]


def client(store: Path):
    from ssltk import store as mlflow_store

    return mlflow_store.client(f"sqlite:///{store}")


def checkpoint_hash(out: Path, step: int) -> str:
    return (out / "checkpoints" / f"ckpt-{step:08d}.pt.sha256").read_text().split()[0]


def wait_for(condition, proc: Proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.code} before expected:\n{proc.output}"
        assert time.monotonic() < deadline, proc.output
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------------
# Must show: interrupts during a first start-up; four first runs on one fresh store


def test_twenty_interrupts_of_a_first_start_up_leave_a_usable_store_and_exact_resume(
    ws, forker, tmp_path
):
    reference = tmp_path / "reference"
    started = time.monotonic()
    proc = forker.start(*pretrain_argv(ws, reference, store=tmp_path / "s0" / "mlflow.db"))
    wait_for(lambda: (reference / "run.json").exists(), proc)  # written just before step 1
    start_up = time.monotonic() - started  # data, store creation, model, MLflow run
    assert proc.wait() == 0, proc.output

    out = tmp_path / "resumed"
    draw = random.Random(12)
    usable = 0
    for attempt in range(20):
        store = tmp_path / f"s{attempt + 1}" / "mlflow.db"  # fresh: this is its first run
        proc = forker.start(*pretrain_argv(ws, out, store=store))
        time.sleep(draw.uniform(0, start_up))
        proc.signal(signal.SIGINT if attempt % 2 else signal.SIGTERM)
        code = proc.wait()
        assert code in (0, 130), proc.output  # 0: it had finished already
        said = [line for line in proc.output.splitlines() if not line.startswith("step ")]
        assert (
            code == 0
            or said in ([], ["error: interrupted"])
            or (len(said) == 1 and said[0].startswith("error: interrupted after step"))
        ), proc.output  # nothing: Ctrl-C while click parsed the arguments (it exits 130 quietly)
        assert not list(store.parent.glob(".mlflow.db.*")), "temporary or lock file left"
        if not store.exists():  # interrupted before or while creating it: nothing half-made
            continue
        mlflow = client(store)  # complete: opens without migrating
        record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        if record.get("tracking_uri") == f"sqlite:///{store}":
            run = mlflow.get_run(record["run_id"])
            assert run.info.status in ("KILLED", "FINISHED") and run.data.params
        assert mlflow.search_experiments()
        usable += 1
    print(f"start-up {start_up:.1f} s; {usable} of 20 stores created before the interrupt")

    proc = forker.start(*pretrain_argv(ws, out, store=tmp_path / "s20" / "mlflow.db"))
    assert proc.wait() == 0, proc.output
    assert checkpoint_hash(out, 2) == checkpoint_hash(reference, 2)
    assert (out / "curve.csv").read_text() == (reference / "curve.csv").read_text()


PRETRAIN_RUNS = "tags.`ssltk.kind` = 'pretrain'"
STUDY_RUNS = "tags.`ssltk.kind` = 'study'"  # the parent of every pretraining run (ssltk.tracking)


def test_four_first_runs_on_one_fresh_store_all_finish_complete(ws, forker, tmp_path):
    store = tmp_path / "store" / "mlflow.db"
    procs = [forker.start(*pretrain_argv(ws, tmp_path / f"run{i}", store=store)) for i in range(4)]
    for proc in procs:
        assert proc.wait() == 0, proc.output
        assert "Traceback" not in proc.output, proc.output
    mlflow = client(store)
    experiment = mlflow.get_experiment_by_name("rely")
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=PRETRAIN_RUNS)
    assert len(runs) == 4
    (study,) = mlflow.search_runs([experiment.experiment_id], filter_string=STUDY_RUNS)
    assert {run.data.tags["mlflow.parentRunId"] for run in runs} == {study.info.run_id}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["pretrain.max_steps"] == "2"
        history = mlflow.get_metric_history(run.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [0, 1]
        assert [a.path for a in mlflow.list_artifacts(run.info.run_id, "checkpoint")] == [
            "checkpoint/ckpt-00000002.pt",
            "checkpoint/ckpt-00000002.pt.sha256",
        ]


# --------------------------------------------------------------------------------------------------
# 3, 4: one run per directory; a killed run resumes (its lock gone) without logging a step twice


def test_a_second_run_on_a_run_directory_refuses_at_once_naming_the_holder(ws, forker, tmp_path):
    out, store = tmp_path / "shared", tmp_path / "store" / "mlflow.db"
    first = forker.start(*pretrain_argv(ws, out, "pretrain.max_steps=4", store=store))
    curve = out / "curve.csv"
    wait_for(lambda: curve.exists() and len(curve.read_text().splitlines()) >= 2, first)

    started = time.monotonic()
    second = forker.start(*pretrain_argv(ws, out, "pretrain.max_steps=4", "seed=4", store=store))
    line = one_error((second.wait(), second.output))
    assert f"pid {first.pid}" in line and str(out) in line
    assert time.monotonic() - started < 15  # at once: no model was built
    assert first.wait() == 0, first.output
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    history = client(store).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    experiment_id = client(store).get_run(run_id).info.experiment_id
    assert len(client(store).search_runs([experiment_id], filter_string=PRETRAIN_RUNS)) == 1


def test_a_killed_run_resumes_without_logging_a_step_twice(ws, forker, tmp_path):
    out, store = tmp_path / "killed", tmp_path / "store" / "mlflow.db"
    sets = ("pretrain.epochs=2", "pretrain.max_steps=6", "pretrain.checkpoint_every=4")
    first = forker.start(*pretrain_argv(ws, out, *sets, store=store))
    curve = out / "curve.csv"  # SIGKILL once step 4 (0-based) is logged: past checkpoint 4
    wait_for(lambda: curve.exists() and len(curve.read_text().splitlines()) >= 6, first)
    first.signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    steps = sorted(int(p.name[5:13]) for p in (out / "checkpoints").glob("ckpt-*.pt"))
    assert steps == [4], "killed after checkpoint 4 and before 6"

    second = forker.start(*pretrain_argv(ws, out, *sets, store=store))  # the lock died with it
    assert second.wait() == 0, second.output
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    for name in ("train/loss", "train/lr"):
        history = client(store).get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == list(range(6)), name
    rows = curve.read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(6))


# --------------------------------------------------------------------------------------------------
# 7: an unreachable tracking server; small: Ctrl-C while importing


def test_an_unreachable_tracking_server_is_one_line_within_seconds(ws, forker, tmp_path):
    started = time.monotonic()
    proc = forker.start(*pretrain_argv(ws, tmp_path / "out", "tracking.uri=http://127.0.0.1:1"))
    line = one_error((proc.wait(timeout=90), proc.output))
    assert "http://127.0.0.1:1" in line and "Connection refused" in line
    assert time.monotonic() - started < 45
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_importing_is_one_line(ws, tmp_path):
    command = [sys.executable, "-m", "ssltk", "pretrain", "--params", str(ws.params)]
    proc = subprocess.Popen(
        [*command, "--out", str(tmp_path / "out")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    maps = Path(f"/proc/{proc.pid}/maps")  # SIGINT while torch's libraries are being loaded
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if "libtorch" in maps.read_text():
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip() == "error: interrupted", stderr
    assert not (tmp_path / "out").exists()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
