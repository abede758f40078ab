"""Small ImageFolder trees cut from the shipped demo archive, for tests preparing their own data."""

from __future__ import annotations

import tarfile
from pathlib import Path

DEMO_ARCHIVE = Path(__file__).resolve().parents[1] / "ssltk" / "assets" / "cifar10-demo.tar.gz"


def demo_imagefolder(
    root: Path, train: int, held_out: int = 1, held_out_split: str = "test"
) -> Path:
    """The first ``train`` images of each class of the archive's train split under
    ``root/train/<class>/``, and the next ``held_out`` under ``root/<held_out_split>/<class>/``."""
    taken: dict[str, int] = {}
    with tarfile.open(DEMO_ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] != "train":
                continue
            label = parts[-2]
            count = taken.get(label, 0)
            if count >= train + held_out:
                continue
            taken[label] = count + 1
            split = "train" if count < train else held_out_split
            target = root / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return root
