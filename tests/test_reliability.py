"""Faults and bad input, in process: every case ends in one line and exit 2, or in the right data.

Prepared data checked against the config, pruning that counts only verified checkpoints, store
creation that an interrupt cannot leave half-done, full and read-only disks, symlink loops,
non-UTF-8 files, duplicate YAML keys, non-finite values, truncated arrays, incomplete and
malicious checkpoints, decompression bombs. Process-level behaviour (locks, signals, concurrent
runs) is in test_reliability_process.py, which shares :func:`make_workspace`.
"""

from __future__ import annotations

import builtins
import json
import os
import resource
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import Result
from demo_images import demo_imagefolder
from PIL import Image
from typer.testing import CliRunner

from ssltk import store as mlflow_store
from ssltk import tracking
from ssltk.cli import app
from ssltk.config import load_config
from ssltk.data.prepare import _ArrayWriter, prepare
from ssltk.errors import UserError
from ssltk.train.checkpoint import load_checkpoint, save_checkpoint, sha256_file, sidecar_path


@dataclass(frozen=True)
class Workspace:
    root: Path
    params: Path
    store: Path

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.store}"

    def run_json(self, out: Path) -> dict:
        return json.loads((out / "run.json").read_text())


def make_workspace(root: Path) -> Workspace:
    """20 images (5 steps of 4 per epoch), rotation on ResNet50 w1 at 32 px, on the CPU."""
    store = root / "store" / "mlflow.db"
    params = {
        "seed": 3,
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(root / "images", 2)),
            "val_fraction": 0,
            "prepared_dir": str(root / "prepared"),
        },
        "model": {"arch": "resnet50_v1", "widening": 1},
        "pretext": {"task": "rotation", "input_size": 32},
        "pretrain": {
            "epochs": 1,
            "batch_size": 4,
            "warmup_epochs": 0,
            "decay_epochs": [],
            "checkpoint_every": 1,
            "keep_checkpoints": 5,
            "log_every": 1,
            "max_steps": 2,
            "device": "cpu",
        },
        "tracking": {"uri": f"sqlite:///{store}", "experiment": "rely"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    prepare(load_config(path), progress=False)
    return Workspace(root, path, store)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make_workspace(tmp_path_factory.mktemp("rely"))
    torch.set_num_threads(threads)


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def pretrain(ws: Workspace, out: Path, *sets: str) -> Result:
    overrides = [arg for item in sets for arg in ("--set", item)]
    return cli("pretrain", "--params", str(ws.params), "--out", str(out), *overrides)


def one_error(result: Result | tuple[int, str], code: int = 2) -> str:
    """The one ``error:`` line of a failed command, last on stderr (progress lines may precede
    it), asserting the exit code and that nothing else went wrong (no traceback, no warning)."""
    exit_code, stderr = result if isinstance(result, tuple) else (result.exit_code, result.stderr)
    assert exit_code == code, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("step ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and lines[-1] == errors[0], stderr
    return errors[0]


@contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# --------------------------------------------------------------------------------------------------
# 1. prepared data is checked against data.*, and recorded with the run


def test_prepared_data_from_other_settings_is_refused_before_any_work(workspace):
    out = workspace.root / "mismatch"
    line = one_error(pretrain(workspace, out, "data.source=stl10", "data.root=nowhere"))
    assert "data.source" in line and "'imagefolder'" in line and "ssltk prepare" in line
    line = one_error(pretrain(workspace, out, "data.image_size=64", "pretext.input_size=64"))
    assert "data.image_size" in line and "32" in line and "64" in line
    assert not out.exists()


def test_a_run_records_the_settings_of_its_prepared_data(workspace):
    out = workspace.root / "recorded"
    result = pretrain(workspace, out)
    assert result.exit_code == 0, result.output
    manifest = json.loads((workspace.root / "prepared" / "manifest.json").read_text())
    assert manifest["settings"]["data.source"] == "imagefolder"
    fingerprint = manifest["settings_fingerprint"]
    record = workspace.run_json(out)
    assert record["data_settings"] == fingerprint
    run = mlflow_store.client(workspace.uri).get_run(record["run_id"])
    assert run.data.tags[tracking.TAG_DATA_SETTINGS] == fingerprint
    assert workspace.uri in result.stdout  # the store a run used, said plainly


def test_a_failing_run_leaves_no_empty_run_directory(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # another directory: the default --out is runs/<name> here
    result = cli("pretrain", "--params", str(workspace.params), "--set", "data.prepared_dir=none")
    assert "prepared dataset not found" in one_error(result)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 2. pruning counts only verified checkpoints


def test_a_corrupt_newest_checkpoint_never_evicts_a_new_one(workspace):
    out = workspace.root / "prune"
    sets = ("pretrain.keep_checkpoints=1",)
    assert pretrain(workspace, out, *sets, "pretrain.max_steps=3").exit_code == 0
    newest = out / "checkpoints" / "ckpt-00000003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    result = pretrain(workspace, out, *sets, "pretrain.max_steps=2")
    assert result.exit_code == 0, result.output
    kept = sorted(p.name for p in (out / "checkpoints").glob("ckpt-*.pt"))
    assert kept == ["ckpt-00000002.pt"]
    record = workspace.run_json(out)
    assert Path(record["checkpoint"]).name == "ckpt-00000002.pt"
    assert sha256_file(out / record["checkpoint"]) == record["checkpoint_sha256"]  # relative


# --------------------------------------------------------------------------------------------------
# 5. an interrupted store creation leaves no store


@pytest.mark.parametrize("statement", [400, 800])  # mid-migration (of about 1700)
def test_an_interrupted_store_creation_leaves_a_usable_store(tmp_path, statement):
    import sqlalchemy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    count = 0

    def ctrl_c(*args: object) -> None:
        nonlocal count
        count += 1
        if count == statement:
            raise KeyboardInterrupt

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            mlflow_store.ensure_experiment(mlflow_store.client(uri), "x", uri)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", ctrl_c)
    assert [p.name for p in tmp_path.iterdir()] == []
    client = mlflow_store.client(uri)
    experiment = mlflow_store.ensure_experiment(client, "x", uri)
    assert client.create_run(experiment).info.status == "RUNNING"


# --------------------------------------------------------------------------------------------------
# 8. the default store is the project's being run


def test_the_default_store_is_beside_the_params_file(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "params.yaml").write_text("tracking: {uri: null}\n")
    config = load_config(clone / "params.yaml")
    assert config.tracking.resolved_uri() == f"sqlite:///{clone.resolve()}/mlflow.db"
    relative = load_config(clone / "params.yaml", ["tracking.uri=sqlite:///s/x.db"])
    assert relative.tracking.resolved_uri() == f"sqlite:///{clone.resolve()}/s/x.db"
    temp_copy = clone / ".dvc" / "tmp" / "exps" / "tmpab12"  # dvc exp run --temp
    temp_copy.mkdir(parents=True)
    (temp_copy / "params.yaml").write_text("seed: 1\n")
    copied = load_config(temp_copy / "params.yaml")
    assert copied.tracking.resolved_uri() == f"sqlite:///{clone.resolve()}/mlflow.db"


# --------------------------------------------------------------------------------------------------
# 9. prepare on a full disk


def test_prepare_reserves_its_arrays_so_a_full_disk_cannot_sigbus(tmp_path):
    writer = _ArrayWriter(tmp_path, "train", capacity=64, size=32)
    size = writer.path.stat().st_size
    assert writer.path.stat().st_blocks * 512 >= size  # allocated, not a sparse hole


def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(workspace, tmp_path):
    config = load_config(workspace.params, [f"data.prepared_dir={tmp_path / 'p'}"])
    with file_size_limit(16 * 1024), pytest.raises(UserError) as caught:
        prepare(config, progress=False)
    message = str(caught.value)
    assert "File too large" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 10, 11. full disk during pretrain, read-only --out


def test_a_full_disk_during_pretrain_is_one_line_and_leaves_no_temp_file(workspace):
    out = workspace.root / "full"
    with file_size_limit(4 * 1024 * 1024):  # the store and logs fit, a 12 MB checkpoint does not
        result = pretrain(workspace, out)
    line = one_error(result)
    assert "File too large" in line and "ckpt-00000001.pt" in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    record = workspace.run_json(out)
    assert record["status"] == "failed" and "File too large" in record["failure"]
    run = mlflow_store.client(workspace.uri).get_run(record["run_id"])
    assert run.info.status == "FAILED"


def test_a_read_only_out_is_one_line(workspace, monkeypatch):
    out = workspace.root / "read-only"
    out.mkdir()
    real_os_open, real_open = os.open, builtins.open

    def refused(path: object) -> bool:
        return out == Path(path) or out in Path(path).parents

    def os_open(path, flags, *args, **kwargs):  # root ignores chmod: refuse writes under out
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    def builtin_open(path, mode="r", *args, **kwargs):
        if isinstance(path, str | Path) and refused(path) and set(mode) & set("wax+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)
    line = one_error(pretrain(workspace, out))
    assert str(out) in line and "Permission denied" in line
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 12, 13, 14 and the small ones: data and config input


def test_a_symlink_loop_in_an_imagefolder_is_read_once(workspace, tmp_path, capfd):
    root = demo_imagefolder(tmp_path / "tree", 1)
    (root / "train" / "airplane" / "again").symlink_to("..", target_is_directory=True)
    config = load_config(
        workspace.params, [f"data.root={root}", f"data.prepared_dir={tmp_path / 'p'}"]
    )
    manifest = prepare(config, progress=False)
    assert manifest["counts"]["train"] == 10
    assert "symlink loop" in capfd.readouterr().err


def test_non_utf8_params_and_file_list_are_one_line(workspace, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes("seed: 1\ntracking: {experiment: caf\xe9}\n".encode("latin-1"))
    line = one_error(cli("config", "--params", str(params)))
    assert str(params) in line and "line 2" in line and "UTF-8" in line

    root = demo_imagefolder(tmp_path / "tree", 1)
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"train/airplane/caf\xe9.jpg 0\n")
    sets = ["data.source=imagefolder", f"data.root={root}", f"data.file_list={listing}"]
    sets.append(f"data.prepared_dir={tmp_path / 'p'}")
    line = one_error(cli("prepare", "--params", str(workspace.params), *_sets(sets)))
    assert str(listing) in line and "UTF-8" in line


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_a_duplicate_yaml_key_is_refused(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  epochs: 3\n  batch_size: 8\n  epochs: 5\n")
    line = one_error(cli("config", "--params", str(params)))
    assert "line 4" in line and "duplicate key 'epochs'" in line


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pretrain.base_lr=.inf", "pretrain.base_lr"),
        ("pretrain.weight_decay=.inf", "pretrain.weight_decay"),
        ("pretext.exemplar.margin=.inf", "pretext.exemplar.margin"),
        ("pretrain.decay_epochs=[1, .inf]", "pretrain.decay_epochs.1"),
        ("seed=99999999999999999999999", "seed"),
        ("seed=9223372036854775808", "seed"),
        ("tracking.uri=sqlite:/x.db", "tracking.uri"),
        ("tracking.uri=sqlite:///", "tracking.uri"),
    ],
)
def test_the_schema_refuses_values_that_would_crash_later(override, key):
    with pytest.raises(UserError, match=rf"^defaults with --set: {key}: "):
        load_config(None, [override])
    assert load_config(None, ["seed=9223372036854775807"]).seed == 2**63 - 1


def test_truncated_prepared_arrays_ask_for_prepare(workspace, tmp_path):
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for item in (workspace.root / "prepared").iterdir():
        (prepared / item.name).write_bytes(item.read_bytes())
    images = prepared / "train_images.npy"
    images.write_bytes(images.read_bytes()[:1000])
    line = one_error(pretrain(workspace, tmp_path / "out", f"data.prepared_dir={prepared}"))
    assert str(images) in line and "ssltk prepare" in line


def test_an_image_over_the_pixel_limit_is_a_bad_image(workspace, tmp_path, monkeypatch, recwarn):
    root = demo_imagefolder(tmp_path / "tree", 1)
    bomb = root / "train" / "airplane" / "bomb.png"
    Image.new("RGB", (40, 40)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)  # 1600 px: over it, not 2× over
    config = load_config(
        workspace.params, [f"data.root={root}", f"data.prepared_dir={tmp_path / 'p'}"]
    )
    with pytest.raises(UserError, match=r"bomb\.png.*exceeds limit"):
        prepare(config, progress=False)
    skip = load_config(
        workspace.params,
        [f"data.root={root}", f"data.prepared_dir={tmp_path / 'p'}", "data.on_bad_image=skip"],
    )
    assert prepare(skip, progress=False)["skipped"] == [str(bomb)]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --------------------------------------------------------------------------------------------------
# small: incomplete and malicious checkpoints are skipped, each in one line


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_incomplete_and_pickled_code_checkpoints_are_skipped_in_one_line(workspace, tmp_path):
    out = tmp_path / "out"
    assert pretrain(workspace, out, "pretrain.max_steps=1").exit_code == 0
    folder = out / "checkpoints"
    good = load_checkpoint(folder / "ckpt-00000001.pt")
    incomplete = {k: v for k, v in good.items() if k not in ("optimizer", "epoch_meter")}
    save_checkpoint(incomplete, folder, 3)
    evil = folder / "ckpt-00000002.pt"
    torch.save({"format": 1, "model": _Exploit()}, evil)
    sidecar_path(evil).write_text(f"{sha256_file(evil)}  {evil.name}\n")

    result = pretrain(workspace, out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if not line.startswith("step ")]
    assert len(warnings) == 2 and all(w.startswith("warning: skipping") for w in warnings)
    assert "ckpt-00000003.pt" in warnings[0] and "optimizer, epoch_meter" in warnings[0]
    assert "ckpt-00000002.pt" in warnings[1] and "os.system" in warnings[1].replace("posix", "os")
    assert "weights_only" not in result.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_arrays_written_by_prepare_are_whole(tmp_path):
    writer = _ArrayWriter(tmp_path, "train", capacity=2, size=4)
    writer.add(np.full((3, 4, 4), 7, np.uint8), 1)
    writer.close()
    assert np.load(tmp_path / "train_images.npy").shape == (1, 3, 4, 4)
