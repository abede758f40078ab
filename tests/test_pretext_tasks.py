"""Batch construction, heads, parameter groups and readout of the four pretext tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ssltk.config import Config, config_from_dict
from ssltk.data import augment
from ssltk.data.rng import Stream, batch_key, sample_keys
from ssltk.pretext import build_task, register_task, registered_tasks, task_class
from ssltk.pretext.exemplar import Exemplar
from ssltk.pretext.jigsaw import Jigsaw, arrange_slots
from ssltk.pretext.permutations import load_permutations
from ssltk.pretext.relative_patch_location import RelativePatchLocation, neighbour_centre_pairs
from ssltk.pretext.rotation import Rotation
from ssltk.pretext.triplet import normalize_embeddings, semihard_triplet_loss

BATCH = 4
TASKS = ("rotation", "exemplar", "jigsaw", "relative_patch_location")


def tiny_config(task: str, **sections: dict) -> Config:
    """A widening-1 ResNet50 v1 at 32 px with small heads; ``sections`` update pretext sections."""
    pretext = {
        "task": task,
        "input_size": 32,
        "exemplar": {"embed_dim": 8, "copies": 3},
        "jigsaw": {"embed_dim": 8, "hidden": 16},
        "relative_patch_location": {"embed_dim": 8, "hidden": 16},
    }
    for name, values in sections.items():
        pretext[name] = {**pretext.get(name, {}), **values}
    model = {"arch": "resnet50_v1", "widening": 1, "memory_saving": False}
    return config_from_dict({"model": model, "pretext": pretext})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # Smooth random images (upsampled noise) so crops differ visibly but not wildly.
    small = torch.randint(0, 256, (BATCH, 3, 8, 8), generator=g, dtype=torch.uint8)
    return nn.functional.interpolate(small.float(), size=(36, 40), mode="bilinear").to(torch.uint8)


@pytest.fixture(scope="module")
def keys() -> torch.Tensor:
    return sample_keys(0, 0, torch.arange(BATCH))


@pytest.fixture(scope="module")
def tasks() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_task(tiny_config(name)) for name in TASKS}


def test_registry_holds_the_four_tasks(tasks):
    assert registered_tasks() == TASKS  # in the order of the study's default
    assert Config().study.tasks == list(TASKS)
    expected = {
        "rotation": Rotation,
        "exemplar": Exemplar,
        "jigsaw": Jigsaw,
        "relative_patch_location": RelativePatchLocation,
    }
    for name, task in tasks.items():
        assert type(task) is expected[name] and task.name == name
    with pytest.raises(ValueError, match="'rotation' is already registered"):
        register_task("rotation")(Rotation)


def test_rotation_batch_holds_all_four_counter_clockwise_rotations(tasks, images, keys):
    batch = tasks["rotation"].prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    assert batch.inputs.shape == (4 * BATCH, 3, 32, 32)
    assert batch.labels.tolist() == [0, 1, 2, 3] * BATCH
    assert batch.inputs.min() >= -1 and batch.inputs.max() <= 1
    for i in range(BATCH):
        upright = batch.inputs[4 * i].permute(1, 2, 0).numpy()  # HWC, as numpy.rot90 expects
        for k in range(4):
            rotated = batch.inputs[4 * i + k].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(rotated, np.rot90(upright, k))


def test_rotation_eval_batch_is_the_deterministic_inception_eval(tasks, images, keys):
    batch = tasks["rotation"].prepare_batch(images, keys, batch_key(0, 0, 0), train=False)
    expected = augment.inception_preprocess(images, None, 0, 32, train=False)
    assert torch.equal(batch.inputs[::4], expected)


def test_rotation_center_crop_trains_on_the_eval_preprocessing(images, keys):
    task = build_task(tiny_config("rotation", rotation={"crop": "center"}))
    train = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    expected = augment.inception_preprocess(images, None, 0, 32, train=False)
    assert torch.equal(train.inputs[::4], expected)
    assert train.labels.tolist() == [0, 1, 2, 3] * BATCH


def test_exemplar_copies_share_the_grayscale_decision(images, keys):
    task = build_task(tiny_config("exemplar", exemplar={"grayscale_p": 0.5}))
    batch = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    copies = 3
    assert batch.inputs.shape == (copies * BATCH, 3, 32, 32)
    assert batch.labels.tolist() == [i for i in range(BATCH) for _ in range(copies)]
    gray = augment.grayscale_mask(keys, Stream.EXEMPLAR_GRAY, 0.5)
    assert 0 < int(gray.sum()) < BATCH, "the fixed keys should give both gray and colour images"
    per_copy = batch.inputs.view(BATCH, copies, 3, 32, 32)
    channels_equal = (per_copy[:, :, 0] == per_copy[:, :, 1]).flatten(2).all(dim=2)
    assert torch.equal(channels_equal, gray[:, None].expand(BATCH, copies))
    # Independent crops per copy, each standardised.
    assert not torch.equal(per_copy[:, 0], per_copy[:, 1])
    flat = batch.inputs.flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(copies * BATCH), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(copies * BATCH))


@pytest.mark.parametrize("name", TASKS)
def test_batches_are_deterministic_and_independent_of_batch_composition(tasks, images, keys, name):
    task = tasks[name]
    full = task.prepare_batch(images, keys, batch_key(0, 0, 3), train=True)
    again = task.prepare_batch(images, keys, batch_key(0, 0, 3), train=True)
    assert torch.equal(full.inputs, again.inputs) and torch.equal(full.labels, again.labels)
    part = task.prepare_batch(images[1:3], keys[1:3], batch_key(0, 0, 3), train=True)
    per_image = full.inputs.shape[0] // BATCH if name in ("rotation", "exemplar") else 1
    assert torch.equal(part.inputs, full.inputs[per_image : 3 * per_image])
    other = task.prepare_batch(images, keys.flip(0), batch_key(0, 0, 3), train=True)
    assert not torch.equal(other.inputs, full.inputs)


def test_exemplar_loss_is_the_triplet_loss_of_normalised_logits(images, keys):
    for normalize, dim in (("per_vector", 1), ("faithful_axis0", 0)):
        torch.manual_seed(0)
        task = build_task(tiny_config("exemplar", exemplar={"normalize": normalize})).eval()
        batch = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
        output = task(batch)
        logits = task.backbone(batch.inputs)["logits"]
        normalised = normalize_embeddings(logits, normalize)
        assert torch.equal(normalised, nn.functional.normalize(logits, dim=dim))
        expected = semihard_triplet_loss(normalised, batch.labels)
        torch.testing.assert_close(output.loss, expected)
        assert 0 <= float(output.metrics["nn_accuracy"]) <= 1


def test_jigsaw_shares_permutations_across_the_batch(tasks, images, keys):
    task = tasks["jigsaw"]
    batch = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    labels = batch.labels.view(BATCH, 8)
    assert (labels == labels[0]).all() and len(set(labels[0].tolist())) == 8
    assert labels.min() >= 0 and labels.max() < 100
    other_step = task.prepare_batch(images, keys, batch_key(0, 0, 1), train=True)
    assert not torch.equal(other_step.labels, batch.labels)
    assert batch.inputs.shape == (BATCH, 9, 3, 9, 9)


def test_jigsaw_per_image_permutations_and_eval_uses_all(images, keys):
    task = build_task(tiny_config("jigsaw", jigsaw={"per_image_perms": True, "perm_subset": 5}))
    labels = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True).labels.view(BATCH, 5)
    assert len({tuple(row) for row in labels.tolist()}) == BATCH
    assert all(len(set(row)) == 5 for row in labels.tolist())
    evaluation = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=False)
    assert evaluation.labels.tolist() == list(range(100)) * BATCH


def test_arrange_slots_puts_patch_pi_s_in_slot_s():
    embeddings = torch.arange(2 * 3 * 2).float().view(2, 3, 2)  # [B=2, P=3, E=2]
    order = torch.tensor([[[2, 0, 1]], [[1, 2, 0]]])  # one permutation per image
    expected = torch.tensor(
        [[4.0, 5.0, 0.0, 1.0, 2.0, 3.0], [8.0, 9.0, 10.0, 11.0, 6.0, 7.0]]
    )  # image 0: patches 2, 0, 1; image 1: patches 1, 2, 0
    assert torch.equal(arrange_slots(embeddings, order), expected)


class PatchIdentity(nn.Module):
    """A patch-mode backbone whose embedding names its patch: the patch's mean, plus ``d / 100``
    in dimension ``d`` (so slot-major concatenation is visible too)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": x.mean(dim=(1, 2, 3))[:, None] + torch.arange(self.embed_dim) / 100}


def test_jigsaw_label_selects_the_permutation_that_orders_the_slots(images, keys):
    # For label k and permutation π = permutations[k], slot s of the head input holds the
    # embedding of patch π[s] (paper §2.3; the inverse permutation would be another task).
    config = tiny_config("jigsaw", jigsaw={"per_image_perms": True, "perm_subset": 5})
    task = build_task(config).eval()
    task.backbone = PatchIdentity(embed_dim=8)
    batch = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    assert batch.labels.shape == (BATCH * 5,)
    # Patch p of image i holds the value 10·i + p everywhere.
    value = 10.0 * torch.arange(BATCH)[:, None] + torch.arange(9)[None, :]
    batch.inputs = value[:, :, None, None, None].expand(batch.inputs.shape).contiguous()
    seen = []
    task.head.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    output = task(batch)

    permutations = load_permutations()
    expected = torch.stack(
        [
            10.0 * (row // 5) + permutations[label][:, None] + torch.arange(8) / 100
            for row, label in enumerate(batch.labels.tolist())
        ]
    ).flatten(1)
    assert any(not torch.equal(permutations[k].argsort(), permutations[k]) for k in batch.labels)
    torch.testing.assert_close(seen[0], expected)
    expected_loss = nn.functional.cross_entropy(task.head(expected), batch.labels)
    torch.testing.assert_close(output.loss, expected_loss)


def test_neighbour_centre_pairs_and_labels(tasks, images, keys):
    embeddings = torch.arange(9).float()[None, :, None].expand(2, 9, 1) + torch.tensor(
        [[[0.0]], [[100.0]]]
    )
    pairs = neighbour_centre_pairs(embeddings)
    assert pairs[:8].tolist() == [[n, 4.0] for n in (0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0)]
    assert pairs[8].tolist() == [100.0, 104.0]
    batch = tasks["relative_patch_location"].prepare_batch(
        images, keys, batch_key(0, 0, 0), train=True
    )
    assert batch.labels.tolist() == list(range(8)) * BATCH


@pytest.mark.parametrize("name", ["jigsaw", "relative_patch_location"])
def test_patch_task_forward_shapes(tasks, images, keys, name):
    task = tasks[name].eval()
    batch = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    output = task(batch)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    assert batch.inputs.shape[:2] == (BATCH, 9)
    assert 0 <= float(output.metrics["accuracy"]) <= 1


@pytest.mark.parametrize("gray_p", [0.0, 1.0])
def test_eval_patches_equal_the_augment_pipeline(images, keys, gray_p):
    task = build_task(tiny_config("jigsaw", patches={"grayscale_p": gray_p}))
    patches = task.sample_patches(images, keys, train=False)
    layout = task.layout  # 42 → centre crop 36 → 12-px cells → 9-px patches at jitter 1 (3 // 2)
    x = augment.resize_bilinear(images, layout.resize)
    x = augment.to_gray(x, torch.full((BATCH,), gray_p == 1.0))
    x = augment.crop(x, augment.center_crop_offsets(x.shape[-2:], layout.crop, BATCH), layout.crop)
    for index in range(9):
        row, col = divmod(index, 3)
        top = torch.tensor([row * layout.cell + 1, col * layout.cell + 1]).expand(BATCH, 2)
        expected = augment.standardize(augment.crop(x, top, layout.patch))
        torch.testing.assert_close(patches[:, index], expected, atol=1e-5, rtol=1e-5)


def test_train_patches_without_crop_or_jitter_freedom_equal_eval(images, keys):
    config = tiny_config("relative_patch_location", patches={"resize": 30, "crop": 30, "jitter": 0})
    config.pretext.preprocessing = "tf1"  # the default also draws a sub-pixel phase in training
    task = build_task(config)
    train = task.sample_patches(images, keys, train=True)
    assert torch.equal(train, task.sample_patches(images, keys, train=False))
    gray = augment.grayscale_mask(keys, Stream.PATCH_GRAY, 0.66)
    assert torch.equal((train[:, :, 0] == train[:, :, 1]).flatten(1).all(1), gray)


def test_train_patches_are_jittered(tasks, images, keys):
    task = tasks["jigsaw"]
    assert not torch.equal(
        task.sample_patches(images, keys, train=True),
        task.sample_patches(images, keys, train=False),
    )


@pytest.mark.parametrize("name", TASKS)
def test_param_groups_cover_every_parameter_once(tasks, name):
    task = tasks[name]
    groups = task.param_groups(1e-4)
    seen = [id(p) for group in groups for p in group["params"]]
    assert len(seen) == len(set(seen)) == len(list(task.parameters()))
    decay = {id(p): group["weight_decay"] for group in groups for p in group["params"]}
    assert decay[id(task.backbone.logits.weight)] == 1e-4
    assert decay[id(task.backbone.logits.bias)] == 0.0
    if name in ("jigsaw", "relative_patch_location"):
        assert decay[id(task.head[0].weight)] == decay[id(task.head[4].weight)] == 5e-4
        assert decay[id(task.head[0].bias)] == decay[id(task.head[1].weight)] == 0.0


def test_patch_head_initialisation(tasks):
    head = tasks["jigsaw"].head
    assert head[0].in_features == 9 * 8 and head[4].out_features == 100
    assert torch.all(head[0].bias == 0.1) and torch.all(head[4].bias == 0)
    weight = head[0].weight.detach()
    assert weight.abs().max() <= 0.01 and 0.003 < float(weight.std()) < 0.005
    assert head[1].momentum == 0.003 and head[1].eps == 1e-5 and head[3].p == 0.5


@pytest.mark.parametrize("name", ["rotation", "exemplar"])
def test_full_image_representation(tasks, images, name):
    task = tasks[name].eval()
    out = task.representation(images, ["pre_logits", "block4"])
    resized = augment.resize_small(images, 37)  # round(256 · 32 / 224)
    x = augment.crop(resized, augment.center_crop_offsets(resized.shape[-2:], 32, BATCH), 32)
    expected = task.backbone(augment.to_minus1_1(x))
    assert torch.equal(out["pre_logits"], expected["pre_logits"])
    assert out["block4"].shape == expected["block4"].shape
    pooled = task.representation(images, ["block4"], pool=lambda v: v.amax(dim=(2, 3)))
    assert torch.equal(pooled["block4"], expected["block4"].amax(dim=(2, 3)))
    with pytest.raises(ValueError, match="unknown endpoint 'block9'"):
        task.representation(images, ["block9"])


def test_patch_representation_averages_per_patch_endpoints(tasks, images):
    task = tasks["relative_patch_location"].eval()
    out = task.representation(images, ["pre_logits"], pool=None)
    x = augment.resize_small(images, 32)  # shorter side 32; centre 27×27 crop = 3×3 patches of 9
    corner = augment.center_crop_offsets(x.shape[-2:], 27, BATCH)
    per_patch = []
    for index in range(9):
        row, col = divmod(index, 3)
        patch = augment.crop(x, corner + torch.tensor([9 * row, 9 * col]), 9)
        per_patch.append(task.backbone(augment.standardize(patch))["pre_logits"])
    torch.testing.assert_close(out["pre_logits"], torch.stack(per_patch, 1).mean(1))
    maxed = task.representation(images, ["block2"], pool=lambda v: v.amax(dim=(2, 3)))
    assert maxed["block2"].shape == (
        BATCH,
        task.backbone(torch.zeros(1, 3, 9, 9))["block2"].shape[1],
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", TASKS)
def test_cuda_batches_match_cpu_and_train(tasks, images, keys, name):
    task = tasks[name]
    expected = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    task = task.cuda().train()
    for device_keys in (keys, keys.cuda()):
        batch = task.prepare_batch(images.cuda(), device_keys, batch_key(0, 0, 0), train=True)
        assert batch.inputs.is_cuda and batch.labels.is_cuda
        torch.testing.assert_close(batch.inputs.cpu(), expected.inputs, atol=1e-4, rtol=1e-4)
        assert torch.equal(batch.labels.cpu(), expected.labels)
    output = task(batch)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)
    representation = task.eval().representation(images.cuda(), ["pre_logits"])
    assert representation["pre_logits"].is_cuda
    task.cpu()


def test_tasks_carry_their_traits():

    assert {t for t in TASKS if task_class(t).patch_mode} == {"jigsaw", "relative_patch_location"}
    assert {t for t in TASKS if task_class(t).couples_batch} == {"exemplar"}
    assert {t: task_class(t).metric for t in TASKS}["exemplar"] == "nn_accuracy"
    chance = {t: task_class(t).chance_level(Config()) for t in TASKS}
    assert chance["rotation"] == 0.25 and chance["jigsaw"] == 0.01
    assert chance["relative_patch_location"] == 0.125
    assert chance["exemplar"] == 7 / (8 * 64 - 1)  # 7 other views among 8·64 − 1 embeddings


def test_only_a_batch_coupled_loss_warns_under_data_parallel_global_semantics():
    exemplar, rotation = task_class("exemplar"), task_class("rotation")
    assert "exemplar's loss sees each rank's share" in exemplar.data_parallel_warning(2, False)
    assert exemplar.data_parallel_warning(1, False) is None
    assert exemplar.data_parallel_warning(2, True) is None
    assert rotation.data_parallel_warning(8, False) is None
