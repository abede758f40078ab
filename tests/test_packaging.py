"""What ``pip install`` ships: every ssltk package, with the top-level ``kernels/`` folder installed
as ``ssltk.kernels`` (the bare name belongs to another distribution on PyPI)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_and_maps_kernels_into_ssltk():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"ssltk.kernels": "kernels"}
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in ROOT.glob("ssltk/**/__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(on_disk | {"ssltk.kernels"})


def test_ssltk_kernels_is_this_checkouts_kernels_folder():
    import ssltk.kernels.dispatch

    # Fails where ssltk is installed from another checkout: its kernels would be tested instead.
    assert Path(ssltk.kernels.dispatch.__file__).resolve() == ROOT / "kernels" / "dispatch.py"
