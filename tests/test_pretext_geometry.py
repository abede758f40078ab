"""Patch geometry scale rule and the Jigsaw permutation set (paper §2.3)."""

from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from ssltk.config import PatchGeometry
from ssltk.pretext.geometry import resolve_patch_layout
from ssltk.pretext.permutations import PERMUTATIONS_PATH, PERMUTATIONS_SHA256, load_permutations


def test_scale_rule_reproduces_the_paper_at_224():
    layout = resolve_patch_layout(PatchGeometry(), 224)
    assert (layout.resize, layout.crop, layout.cell, layout.jitter, layout.patch) == (
        292,
        255,
        85,
        21,
        64,
    )
    assert (layout.eval_resize, layout.eval_crop, layout.num_patches) == (224, 192, 9)


@pytest.mark.parametrize(
    "size, expected",
    [(32, (42, 36, 12, 3, 9)), (64, (83, 73, 24, 6, 18)), (96, (125, 109, 36, 9, 27))],
)
def test_scale_rule_at_small_inputs(size, expected):
    layout = resolve_patch_layout(PatchGeometry(), size)
    assert (layout.resize, layout.crop, layout.cell, layout.jitter, layout.patch) == expected
    assert layout.eval_crop <= size


def test_explicit_fields_override_the_scale_rule():
    layout = resolve_patch_layout(PatchGeometry(resize=100, crop=90, grid=3, jitter=0), 96)
    assert (layout.resize, layout.crop, layout.cell, layout.jitter, layout.patch) == (
        100,
        90,
        30,
        0,
        30,
    )


def test_inconsistent_geometry_names_the_key():
    with pytest.raises(ValueError, match=r"pretext\.patches\.crop=300"):
        resolve_patch_layout(PatchGeometry(crop=300), 224)
    with pytest.raises(ValueError, match="jitter 40"):
        resolve_patch_layout(PatchGeometry(jitter=40), 32)
    with pytest.raises(ValueError, match=r"pretext\.input_size=100"):
        resolve_patch_layout(PatchGeometry(resize=300, crop=255, jitter=0), 100)


def test_permutation_set_has_the_documented_properties():
    raw = PERMUTATIONS_PATH.read_bytes()
    assert len(raw) == 3608
    assert hashlib.sha256(raw).hexdigest() == PERMUTATIONS_SHA256
    perms = load_permutations()
    assert perms.shape == (100, 9) and perms.dtype == torch.int64
    assert perms[0].tolist() == [7, 6, 5, 8, 4, 3, 2, 1, 0]
    assert len({tuple(p) for p in perms.tolist()}) == 100
    assert list(range(9)) not in perms.tolist()
    hamming = [int((a != b).sum()) for a, b in itertools.combinations(perms, 2)]
    assert min(hamming) == 2
    assert sum(hamming) / len(hamming) == pytest.approx(8.08, abs=0.005)


def test_wrong_checksum_is_rejected(tmp_path):
    corrupt = bytearray(PERMUTATIONS_PATH.read_bytes())
    corrupt[-4:] = (9).to_bytes(4, "little")
    path = tmp_path / "perms.bin"
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"perms\.bin: SHA-256 [0-9a-f]{64} is not the expected"):
        load_permutations(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        load_permutations(tmp_path / "missing.bin")


def test_malformed_files_are_rejected_without_checksum(tmp_path):
    raw = PERMUTATIONS_PATH.read_bytes()
    short = tmp_path / "short.bin"
    short.write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="header says 100×9"):
        load_permutations(short, sha256=None)
    repeated = bytearray(raw)
    repeated[8:12] = repeated[12:16]  # first row now repeats an entry
    bad = tmp_path / "bad.bin"
    bad.write_bytes(bytes(repeated))
    with pytest.raises(ValueError, match="row 0 is not a permutation"):
        load_permutations(bad, sha256=None)


def test_loaded_table_is_a_private_copy():
    first = load_permutations()
    first.zero_()
    assert load_permutations()[0].tolist() == [7, 6, 5, 8, 4, 3, 2, 1, 0]
