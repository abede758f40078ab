"""Shared fixtures: the project root and the real CIFAR-10 images shipped in the package."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, settings

ROOT = Path(__file__).resolve().parents[1]
DEMO_ARCHIVE = ROOT / "ssltk" / "assets" / "cifar10-demo.tar.gz"

# No per-example deadline: a shared 2-core machine makes timings noisy, and a timing failure says
# nothing about behaviour. No explain phase: after shrinking it re-runs a failing test with each
# argument varied, which under the Triton interpreter took a minute for one kernel test; the
# shrunk example is what matters. On CI the examples are derandomised so a green main stays green.
PHASES = [phase for phase in Phase if phase is not Phase.explain]
settings.register_profile("ssltk", deadline=None, phases=PHASES)
settings.register_profile("ssltk-ci", deadline=None, phases=PHASES, derandomize=True)
settings.load_profile("ssltk-ci" if os.environ.get("CI") else "ssltk")

# Two cores on CI: keep intra-op threads predictable so timings and results are repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def project_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cifar_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo archive unpacked: an ImageFolder tree of 32-px CIFAR-10 JPEGs,
    ``train/<class>/`` (500 per class) and ``test/<class>/`` (100 per class)."""
    target = tmp_path_factory.mktemp("cifar10-demo")
    with tarfile.open(DEMO_ARCHIVE) as archive:
        archive.extractall(target, filter="data")
    return target / "cifar10-demo"
