"""Memory-saving reversible stages under DistributedDataParallel (2 gloo processes on CPU).

Each replica normalises with its own batch statistics (as the paper's TPU replicas do, §3.8), so
the single-process reference runs the same global batch as the two per-replica shards and averages
their gradients: exactly what DDP's all-reduce computes.
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
    """Stem conv, two memory-saving reversible stages (pool-and-pad between), linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stage1 = ReversibleStage(16, 2, memory_saving=True)
        self.stage2 = ReversibleStage(32, 2, entry=PoolAndPadChannels(2), memory_saving=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_model_and_data():
    torch.manual_seed(0)
    model = TinyRevNet()
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
        model, images, labels = make_model_and_data()
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        shard = slice(rank * 2, rank * 2 + 2)
        for step in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(ddp(images[step, shard]), labels[step, shard]).backward()
            opt.step()
        torch.save(model.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def train_reference() -> dict[str, torch.Tensor]:
    model, images, labels = make_model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(WORLD):
            shard = slice(rank * 2, rank * 2 + 2)
            loss = F.cross_entropy(model(images[step, shard]), labels[step, shard])
            (loss / WORLD).backward()
        opt.step()
    return {name: p.detach() for name, p in model.named_parameters()}


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    mp.spawn(train_replica, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = train_reference()
    initial = dict(make_model_and_data()[0].named_parameters())
    for name, expected in reference.items():
        assert torch.equal(states[0][name], states[1][name]), name  # replicas stay in sync
        torch.testing.assert_close(states[0][name], expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(expected, initial[name]), f"{name} was not trained"
