"""Averaging of stacked worker states: exact means, the three policies, and agreement with
PyTorch's PeriodicModelAverager across gloo processes."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments.averaging import AveragingPolicy, WorkerAverager, worker_spread
from experiments.distributed import DistContext


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(seed, K=3, D=7, Db=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, D, generator=g, dtype=torch.float64),
            torch.rand(K, Db, generator=g, dtype=torch.float64),
            torch.randn(K, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("buffers,momentum", [("average", "local"), ("local", "average"), ("reset", "reset")])
def test_policies_in_one_process(buffers, momentum):
    p, b, m = _state(0)
    p0, b0, m0 = p.clone(), b.clone(), m.clone()
    init = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    WorkerAverager(AveragingPolicy(buffers, momentum)).average_(p, b, m, initial_buffers=init)
    assert torch.allclose(p, p0.mean(0).expand_as(p), rtol=0, atol=1e-15)
    expect_b = {"average": b0.mean(0).expand_as(b), "local": b0, "reset": init.expand_as(b)}[buffers]
    expect_m = {"average": m0.mean(0).expand_as(m), "local": m0, "reset": torch.zeros_like(m)}[momentum]
    assert torch.allclose(b, expect_b, rtol=0, atol=1e-15)
    assert torch.allclose(m, expect_m, rtol=0, atol=1e-15)


def test_spread_is_mean_squared_distance_to_the_average():
    p, _, _ = _state(1)
    mean = p.mean(0)
    expected = sum(float(((p[k] - mean) ** 2).sum()) for k in range(3)) / 3
    assert abs(float(worker_spread(p, mean)) - expected) < 1e-12


def test_bad_policy_and_shapes():
    with pytest.raises(ValueError, match="momentum policy"):
        AveragingPolicy(momentum="sometimes")
    with pytest.raises(ValueError, match="stacked"):
        WorkerAverager().average_(torch.zeros(5))
    with pytest.raises(ValueError, match="initial_buffers"):
        WorkerAverager(AveragingPolicy(buffers="reset")).average_(torch.zeros(2, 3), torch.zeros(2, 2))


def _gloo_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
        ctx = DistContext(rank=rank, world_size=world)
        # 1) one worker per process: ours against PeriodicModelAverager on the same parameters
        g = torch.Generator().manual_seed(100 + rank)
        shapes = [(3, 2), (5,), (2, 2, 2)]
        theirs = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
        for t in theirs:  # PeriodicModelAverager skips parameters without a gradient
            t.grad = torch.zeros_like(t)
        ours = torch.cat([t.detach().reshape(-1) for t in theirs]).unsqueeze(0).clone()
        PeriodicModelAverager(period=2, warmup_steps=0).average_parameters(theirs)  # averages at step 0
        extras = WorkerAverager(AveragingPolicy(), ctx).average_(ours, extras=torch.ones(1, dtype=torch.float64))
        # 2) two workers per process, every parameter set to the worker's global index
        rows = torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float64)[:, None].expand(2, 6).clone()
        mom = rows.clone()
        WorkerAverager(AveragingPolicy(momentum="average"), ctx).average_(rows, torch.zeros(2, 0), mom)
        torch.save({"theirs": torch.cat([t.detach().reshape(-1) for t in theirs]), "ours": ours[0],
                    "extras": extras, "rows": rows, "mom": mom}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_matches_periodic_model_averager_and_rank_numbers_average_to_the_mean(tmp_path):
    world = 3
    mp.spawn(_gloo_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for res in results:
        torch.testing.assert_close(res["ours"], res["theirs"], rtol=0, atol=1e-12)
        torch.testing.assert_close(res["ours"], results[0]["ours"], rtol=0, atol=0)
        assert float(res["extras"]) == world        # extras are summed, not averaged
        # workers 0..5 -> mean 2.5 everywhere, momentum too under the "average" policy
        assert torch.equal(res["rows"], torch.full((2, 6), 2.5, dtype=torch.float64))
        assert torch.equal(res["mom"], torch.full((2, 6), 2.5, dtype=torch.float64))
    # and the parameters really differed before averaging
    assert not torch.allclose(results[0]["ours"], torch.zeros_like(results[0]["ours"]))
