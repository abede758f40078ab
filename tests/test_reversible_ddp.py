"""Memory-saving reversible stages under DistributedDataParallel (2 gloo processes on CPU) against
plain autograd in one process.

Each replica normalises with its own batch statistics (as the paper's TPU replicas do, §3.8), so
the single-process reference runs the same global batch as the two per-replica shards through the
plain (store-everything) model and averages their gradients: what DDP's all-reduce computes. The
memory-saving gradients equal plain ones up to reconstruction rounding, hence the tolerance.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssltk.models.revnet import PoolAndPadChannels, ReversibleStage

WORLD = 2
STEPS = 2
LR = 0.5


class TinyRevNet(nn.Module):
    """Stem conv, two reversible stages (pool-and-pad between), linear head."""

    def __init__(self, memory_saving: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stage1 = ReversibleStage(16, 2, memory_saving=memory_saving)
        self.stage2 = ReversibleStage(
            32, 2, entry=PoolAndPadChannels(2), memory_saving=memory_saving
        )
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_model_and_data(memory_saving: bool):
    torch.manual_seed(0)
    model = TinyRevNet(memory_saving)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(STEPS, 2 * WORLD, 3, 8, 8, generator=gen)
    labels = torch.randint(0, 5, (STEPS, 2 * WORLD), generator=gen)
    return model, images, labels


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_replica(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        model, images, labels = make_model_and_data(memory_saving=True)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        shard = slice(rank * 2, rank * 2 + 2)
        first_grads = {}
        for step in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(ddp(images[step, shard]), labels[step, shard]).backward()
            if step == 0:
                first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
        out = Path(out_dir)
        torch.save(model.state_dict(), out / f"rank{rank}.pt")
        torch.save(first_grads, out / f"grads{rank}.pt")
    finally:
        dist.destroy_process_group()


def train_plain_reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Weights after the steps and gradients of the first step, plain autograd."""
    model, images, labels = make_model_and_data(memory_saving=False)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first_grads = {}
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(WORLD):
            shard = slice(rank * 2, rank * 2 + 2)
            loss = F.cross_entropy(model(images[step, shard]), labels[step, shard])
            (loss / WORLD).backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return {name: p.detach() for name, p in model.named_parameters()}, first_grads


def test_ddp_memory_saving_matches_plain_autograd(tmp_path):
    mp.spawn(train_replica, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    grads = [torch.load(tmp_path / f"grads{r}.pt", weights_only=True) for r in range(WORLD)]
    weights, plain_grads = train_plain_reference()
    initial = dict(make_model_and_data(memory_saving=False)[0].named_parameters())
    for name, expected in weights.items():
        assert torch.equal(states[0][name], states[1][name]), name  # replicas stay in sync
        assert torch.equal(grads[0][name], grads[1][name]), name  # all-reduced
        torch.testing.assert_close(grads[0][name], plain_grads[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(states[0][name], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(expected, initial[name]), f"{name} was not trained"
