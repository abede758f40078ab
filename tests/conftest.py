"""Shared fixtures: paths to the project and to the real-image archive beside it."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini.tar.gz"

# No per-example deadline: a shared 2-core machine makes timings noisy, and a timing failure says
# nothing about behaviour. On CI the examples are derandomised so a green main stays green.
settings.register_profile("ssltk", deadline=None)
settings.register_profile("ssltk-ci", deadline=None, derandomize=True)
settings.load_profile("ssltk-ci" if os.environ.get("CI") else "ssltk")

# Two cores on CI: keep intra-op threads predictable so timings and results are repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cifar_mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked ``cifar10-mini`` ImageFolder tree (skips when the archive is absent)."""
    if not CIFAR_MINI.is_file():
        pytest.skip(
            f"real-image archive not found at {CIFAR_MINI} (../shared/data beside the project)"
        )
    target = tmp_path_factory.mktemp("cifar10-mini")
    with tarfile.open(CIFAR_MINI) as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10-mini"
