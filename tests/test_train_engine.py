"""Engine parts without data: the SGD step, global BatchNorm, metric meters, trajectory keys."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssltk.config import Config
from ssltk.errors import UserError
from ssltk.pretext import PretextInputs, TaskOutput
from ssltk.train.engine import Trainer
from ssltk.train.meters import EpochMeter, MetricWindow, first_non_finite
from ssltk.train.resume import RESUMABLE_KEYS, trajectory
from ssltk.train.rundir import CurveFile
from ssltk.train.schedule import StepSchedule
from ssltk.train.sync_bn import GlobalBatchNorm, convert_to_global_bn


class TinyTask(nn.Module):
    """A linear classifier standing in for a pretext task."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, batch: PretextInputs) -> TaskOutput:
        logits = self.linear(batch.inputs)
        loss = F.cross_entropy(logits, batch.labels)
        accuracy = (logits.argmax(1) == batch.labels).float().mean()
        return TaskOutput(loss, {"accuracy": accuracy})


def batch(seed: int = 0) -> PretextInputs:
    g = torch.Generator().manual_seed(seed)
    return PretextInputs(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))


def make_trainer(task: TinyTask, wd: float = 0.01, **kwargs) -> Trainer:
    groups = [
        {"params": [task.linear.weight], "weight_decay": wd},
        {"params": [task.linear.bias], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
    schedule = StepSchedule(peak=0.5, warmup_steps=2, boundaries=(3,), decay_factor=0.1)
    return Trainer(task, optimizer, schedule, device=torch.device("cpu"), **kwargs)


def test_step_follows_schedule_and_tf_momentum_with_l2():
    torch.manual_seed(0)
    task = TinyTask()
    trainer = make_trainer(task)
    w, b = task.linear.weight.detach().clone(), task.linear.bias.detach().clone()
    acc_w, acc_b = torch.zeros_like(w), torch.zeros_like(b)
    for step in range(5):
        inputs = batch(step)
        # The TF reference: loss + wd/2·|W|², accum = 0.9·accum + grad, var -= lr·accum.
        ref = nn.Linear(4, 3)
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(b)
        loss = (
            F.cross_entropy(ref(inputs.inputs), inputs.labels) + 0.005 * ref.weight.square().sum()
        )
        loss.backward()
        lr = trainer.schedule(step)
        acc_w, acc_b = 0.9 * acc_w + ref.weight.grad, 0.9 * acc_b + ref.bias.grad
        w, b = w - lr * acc_w, b - lr * acc_b

        used_lr, metrics = trainer.step(inputs, step)
        assert used_lr == pytest.approx([0.0, 0.25, 0.5, 0.05, 0.05][step])
        assert all(g["lr"] == used_lr for g in trainer.optimizer.param_groups)
        assert set(metrics) == {"loss", "accuracy"} and metrics["loss"].ndim == 0
        torch.testing.assert_close(task.linear.weight.detach(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(task.linear.bias.detach(), b, rtol=1e-5, atol=1e-6)
        if step == 0:  # the warm-up starts from a rate of 0
            assert torch.equal(task.linear.weight.detach(), w)


def test_bf16_needs_cuda():
    with pytest.raises(UserError, match=r"pretrain\.precision=bf16"):
        make_trainer(TinyTask(), precision="bf16")


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 5)])
def test_global_batchnorm_matches_batchnorm(group_of_one, shape: tuple[int, ...]):
    torch.manual_seed(0)
    bn_type = nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d
    plain = bn_type(3, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-0.5, 0.5)
    model = nn.Sequential(bn_type(3))
    model[0].load_state_dict(plain.state_dict())
    model[0].eps, model[0].momentum = plain.eps, plain.momentum
    weight = model[0].weight
    model = convert_to_global_bn(model)
    bn = model[0]
    assert isinstance(bn, GlobalBatchNorm) and bn.weight is weight
    assert set(bn.state_dict()) == set(plain.state_dict())

    x = torch.randn(shape) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_plain, out_global = plain(x1), bn(x2)
    torch.testing.assert_close(out_global, out_plain, rtol=1e-5, atol=1e-5)
    grad = torch.randn(shape)
    out_plain.backward(grad)
    out_global.backward(grad)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, plain.running_mean)
    torch.testing.assert_close(bn.running_var, plain.running_var)
    assert bn.num_batches_tracked.item() == 1
    bn.eval(), plain.eval()
    torch.testing.assert_close(bn(x), plain(x))


def test_metric_window_flushes_rows_once():
    window = MetricWindow()
    window.add(0, 0.1, {"loss": torch.tensor(2.0), "accuracy": torch.tensor(0.25)})
    window.add(1, 0.2, {"loss": torch.tensor(1.0), "accuracy": torch.tensor(0.5)})
    rows = window.flush(reduce=lambda t: t * 2)
    assert rows == [
        (0, {"lr": 0.1, "loss": 4.0, "accuracy": 0.5}),
        (1, {"lr": 0.2, "loss": 2.0, "accuracy": 1.0}),
    ]
    assert len(window) == 0 and window.flush() == []
    assert first_non_finite(rows) is None
    assert first_non_finite([*rows, (2, {"loss": float("inf")})]) == (2, float("inf"))


def test_epoch_meter_survives_a_state_round_trip():
    meter = EpochMeter()
    meter.add({"loss": 1.0, "accuracy": 0.5})
    meter.add({"loss": 3.0, "accuracy": 1.0})
    copy = EpochMeter()
    copy.load_state_dict(meter.state_dict())
    assert copy.means() == {"loss": 2.0, "accuracy": 0.75}
    assert copy.close_epoch() == {"loss": 2.0, "accuracy": 0.75}
    assert copy.means() == {} and copy.latest() == {"loss": 2.0, "accuracy": 0.75}
    copy.add({"loss": 5.0, "accuracy": 0.0})
    assert copy.latest() == {"loss": 5.0, "accuracy": 0.0}


def test_curve_file_appends_and_truncates_to_a_checkpoint(tmp_path):
    curve = CurveFile(tmp_path / "curve.csv")
    curve.append([(0, {"loss": 2.5, "lr": 0.0}), (1, {"loss": 2.0, "lr": 0.1})])
    curve.append([(2, {"loss": 1.5, "lr": 0.1})])
    with open(curve.path, "a") as f:
        f.write("3,1.2")  # a line cut short by a kill
    curve.truncate(2)
    assert curve.path.read_text() == "step,loss,lr\n0,2.5,0.0\n1,2.0,0.1\n"
    curve.append([(2, {"loss": 1.5, "lr": 0.1})])
    assert curve.path.read_text().splitlines()[-1] == "2,1.5,0.1"
    curve.reset()
    assert not curve.path.exists()


def test_trajectory_keeps_what_shapes_the_weights():
    config = Config()
    keys = trajectory(config)
    assert {"seed", "pretrain.base_lr", "model.arch", "pretext.task", "data.image_size"} <= set(
        keys
    )
    assert not RESUMABLE_KEYS & set(keys)
    assert not any(k.startswith(("tracking.", "eval.", "study.")) for k in keys)
    changed = config.model_copy(deep=True)
    changed.pretrain.workers = 4
    changed.pretrain.epochs = 90
    assert trajectory(changed) == keys
    changed.pretrain.momentum = 0.5
    assert trajectory(changed) != keys


def test_task_epochs_set_the_epochs_of_the_tasks_they_name():
    config = Config.model_validate(
        {"pretrain": {"epochs": 3, "schedule": "cosine", "task_epochs": {"jigsaw": 6}}}
    )
    assert config.pretrain.for_task("jigsaw").epochs == 6
    assert config.pretrain.for_task("rotation") is config.pretrain
    # A run's trajectory has its own epochs (the cosine's length), not the other tasks' entries.
    rotation = config.model_copy(update={"pretext": config.pretext.model_copy()})
    rotation.pretext.task = "rotation"
    plain = rotation.model_copy(update={"pretrain": rotation.pretrain.model_copy()})
    plain.pretrain.task_epochs = {}
    assert trajectory(rotation) == trajectory(plain)
    jigsaw = config.model_copy(update={"pretext": config.pretext.model_copy()})
    jigsaw.pretext.task = "jigsaw"
    assert trajectory(jigsaw)["pretrain.epochs"] == 6


def test_task_epochs_accept_registered_tasks_only():
    with pytest.raises(ValueError, match="nope"):
        Config.model_validate({"pretrain": {"task_epochs": {"nope": 2}}})
