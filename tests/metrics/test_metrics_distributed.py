"""Sharded evaluation: two gloo processes on CPU, each with half the images, sum to the one-process result."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trustseg.errors import UserError
from trustseg.metrics import BoundaryIoU, ConfusionMatrix, PerImageIoU

WORLD_SIZE = 2
K = 5


def make_stream():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, K, (6, 24, 32), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    logits = torch.randn(6, K, 24, 32, generator=g)
    return logits, target


def metrics():
    return [ConfusionMatrix(K), PerImageIoU(K), BoundaryIoU(K, dilation_ratio=0.05)]


def worker(rank, port, expected):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        logits, target = make_stream()
        shard = slice(rank, None, WORLD_SIZE)
        accs = metrics()
        for acc in accs:
            acc.update(logits[shard], target[shard])
            acc.all_reduce()
        for acc, want in zip(accs, expected):
            for name, value in acc.state_dict()["state"].items():
                torch.testing.assert_close(value, want[name], rtol=1e-12, atol=0, msg=f"rank {rank} {name}")
            # a second sum would double the counts: refused, and the states keep the global sums
            with pytest.raises(UserError, match="already summed"):
                acc.all_reduce()
            for name, value in acc.state_dict()["state"].items():
                torch.testing.assert_close(value, want[name], rtol=1e-12, atol=0, msg=f"rank {rank} {name}")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_over_two_processes_equals_one_process():
    logits, target = make_stream()
    expected = []
    for acc in metrics():
        acc.update(logits, target)
        expected.append(acc.state_dict()["state"])
    assert int(expected[0]["confusion"].sum()) == int((target != 255).sum())  # every labelled pixel, once
    # a worker's failed assertion re-raises here (ProcessRaisedException)
    mp.spawn(worker, args=(free_port(), expected), nprocs=WORLD_SIZE, join=True)
