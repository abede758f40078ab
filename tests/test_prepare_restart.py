"""``ssltk prepare`` killed mid-pass resumes from its last committed chunk and ends with the same
manifest and bytes as an uninterrupted pass."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from ssltk.config import load_config
from ssltk.data.prepare import CHUNK, prepare

PER_CLASS = 200  # 3 classes: 600 train images, 4.7 chunks


def write_tree(root: Path) -> None:
    """4:3 JPEGs of smooth random colour fields: train 3 × PER_CLASS, test 3 × 5."""
    generator = np.random.default_rng(0)
    for split, count in (("train", PER_CLASS), ("test", 5)):
        for label in ("a", "b", "c"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                small = generator.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)
                image.save(folder / f"{i}.jpg", quality=90)


def test_a_killed_prepare_resumes_and_ends_as_an_uninterrupted_pass(tmp_path: Path):
    write_tree(tmp_path / "raw")
    data = {"source": "imagefolder", "root": str(tmp_path / "raw"), "image_size": 32}
    data |= {"val_fraction": 0.1, "prepared_dir": str(tmp_path / "killed")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data}))
    command = [sys.executable, "-m", "ssltk", "prepare", "--params", str(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    journal = tmp_path / ".killed.partial" / "progress.jsonl"
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while first.poll() is None and time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= 3:  # 2 chunks done
            break
        time.sleep(0.002)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (tmp_path / "killed").exists()

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = re.search(r"train: resuming at image (\d+) of (\d+)", again.stderr)
    assert resumed, again.stderr
    start, total = int(resumed[1]), int(resumed[2])
    assert total == 3 * PER_CLASS and CHUNK * 2 <= start < total and start % CHUNK == 0
    assert not (tmp_path / ".killed.partial").exists()

    reference = load_config(params, [f"data.prepared_dir={tmp_path / 'whole'}"])
    whole = prepare(reference, progress=False)
    killed = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert killed["content_hash"] == whole["content_hash"] and killed == whole
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "killed").iterdir())
    for name in names:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
