"""Source ``demo``: the embedded CIFAR-10 subset, an ImageFolder tree of JPEGs inside a
``.tar.gz`` shipped with the package."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ssltk.config import DataConfig
from ssltk.data.sources.base import Source, register_source
from ssltk.data.sources.imagefolder import archive_tree

__all__ = ["DEMO_ARCHIVE"]

DEMO_ARCHIVE = Path(__file__).resolve().parents[2] / "assets" / "cifar10-demo.tar.gz"


@register_source("demo", needs_root=False)
def open_demo(data: DataConfig, root: Path | None) -> Source:
    return replace(archive_tree(DEMO_ARCHIVE, "demo"), native_size=32)
