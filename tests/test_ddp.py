"""A 2-process DistributedDataParallel training step (gloo, CPU, localhost) gives one process's gradients."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparse_attn import SparseMultiheadAttention, causal, sliding_window

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16, dtype=torch.float64)
        self.attn = SparseMultiheadAttention(
            16, 4, batch_first=True, dtype=torch.float64, pattern=causal() & sliding_window(5)
        )
        self.head = nn.Linear(16, 1, dtype=torch.float64)

    def forward(self, x, key_padding_mask):
        h = self.embed(x)
        return self.head(self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0])


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 23, 8, generator=g, dtype=torch.float64)
    padding = torch.zeros(4, 23, dtype=torch.bool)
    padding[1, 19:] = True
    padding[2, 15:] = True
    return x, padding


def _worker(rank, world, port, path):
    torch.set_num_threads(1)  # two processes on a small machine: no thread oversubscription
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(TinyModel())
        x, padding = _data()
        rows = slice(rank * 2, rank * 2 + 2)
        _per_sample_loss(model, x[rows], padding[rows]).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _per_sample_loss(model, x, padding):
    """Mean over samples of each sample's loss, so DDP's gradient average equals the full batch's."""
    out = model(x, padding).squeeze(-1).masked_fill(padding, 0)
    return (out.square().sum(1) / (~padding).sum(1)).mean()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)  # a hung process group must fail the run, not stall CI
def test_ddp_two_processes_match_one_process(tmp_path):
    path = str(tmp_path / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    ddp_grads = torch.load(path)
    model = TinyModel()
    x, padding = _data()
    _per_sample_loss(model, x, padding).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
