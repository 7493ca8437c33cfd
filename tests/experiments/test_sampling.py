"""Worker samplers: coverage, disjointness, determinism, non-IID shards, slicing.

Budget: under 1 s.
"""
import math

import pytest
import torch

from experiments.sampling import WorkerSampler, epoch_generator, worker_range


def test_without_replacement_each_epoch_is_a_permutation_disjoint_over_workers():
    s = WorkerSampler(1000, workers=4, local_batch=25, replacement=False, generator_seed=3)
    assert s.shape == (10, 4, 25)  # default steps = N // (K B_loc)
    e0, e1 = s.epoch(0), s.epoch(1)
    for e in (e0, e1):
        assert e.shape == (10, 4, 25) and e.dtype == torch.int64
        assert torch.equal(torch.sort(e.reshape(-1)).values, torch.arange(1000))
        per_worker = [set(e[:, k].reshape(-1).tolist()) for k in range(4)]
        assert all(len(w) == 250 for w in per_worker)
        assert len(set.union(*per_worker)) == 1000  # disjoint
    assert not torch.equal(e0, e1)
    # the worker split is redrawn each epoch: worker 0's sets overlap only by chance (~1/4)
    overlap = len(set(e0[:, 0].reshape(-1).tolist()) & set(e1[:, 0].reshape(-1).tolist()))
    assert 30 < overlap < 100  # hypergeometric mean 62.5, sd 6.8


def test_epochs_depend_only_on_seed_and_epoch():
    a = WorkerSampler(500, workers=2, local_batch=10, replacement=False, generator_seed=11)
    b = WorkerSampler(500, workers=2, local_batch=10, replacement=False, generator_seed=11)
    c = WorkerSampler(500, workers=2, local_batch=10, replacement=False, generator_seed=12)
    assert torch.equal(a.epoch(7), b.epoch(7))  # a resumed run (fresh object) reproduces epoch 7
    assert torch.equal(a.epoch(7), a.epoch(7))  # no hidden state advanced by a call
    assert not torch.equal(a.epoch(7), c.epoch(7))
    x = torch.rand(3, generator=epoch_generator(1, 2))
    assert torch.equal(x, torch.rand(3, generator=epoch_generator(1, 2)))
    assert not torch.equal(x, torch.rand(3, generator=epoch_generator(2, 1)))


def test_with_replacement_draws_are_uniform_and_repeat():
    n, k, b, steps = 10, 2, 50, 100
    s = WorkerSampler(n, workers=k, local_batch=b, replacement=True, steps_per_epoch=steps)
    e = s.epoch(0)
    assert e.shape == (steps, k, b)
    draws = e.numel()
    rates = torch.bincount(e.reshape(-1), minlength=n).double() / draws
    # each index has rate 1/10 with sd sqrt(0.09 / 10000) = 0.003; 4.5 sd over 10 indices.
    assert (rates - 1 / n).abs().max().item() < 4.5 * math.sqrt((1 / n) * (1 - 1 / n) / draws)
    # i.i.d. draws repeat within one local batch (without replacement they never would)
    assert any(len(set(e[0, w].tolist())) < b for w in range(k))


def test_default_steps_with_replacement_and_explicit_steps():
    assert WorkerSampler(50_000, workers=32, local_batch=128, replacement=False).steps_per_epoch == 12
    s = WorkerSampler(1000, workers=2, local_batch=10, replacement=True, steps_per_epoch=500)
    assert s.epoch(0).shape == (500, 2, 10)
    with pytest.raises(ValueError, match="at most 50 steps"):
        WorkerSampler(1000, workers=2, local_batch=10, replacement=False, steps_per_epoch=51)


def test_label_sorted_shards_give_each_worker_few_classes():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    for workers, classes_each in ((10, 1), (5, 2)):
        for replacement in (False, True):
            s = WorkerSampler(1000, workers=workers, local_batch=20, replacement=replacement,
                              partition="label_sorted", labels=labels, generator_seed=1)
            e = s.epoch(4)
            for k in range(workers):
                assert len(set(labels[e[:, k].reshape(-1)].tolist())) == classes_each
            if not replacement:  # the whole shard, each index once, same shard every epoch
                for k in range(workers):
                    next_epoch = s.epoch(5)[:, k].reshape(-1)
                    assert sorted(e[:, k].reshape(-1).tolist()) == sorted(next_epoch.tolist())
                    assert len(set(e[:, k].reshape(-1).tolist())) == 1000 // workers
                assert not torch.equal(e, s.epoch(5))  # but reshuffled within the shard
    with pytest.raises(ValueError, match="labels"):
        WorkerSampler(1000, workers=5, local_batch=20, replacement=False, partition="label_sorted")


@pytest.mark.parametrize("replacement,partition", [(False, "iid"), (True, "iid"), (False, "label_sorted")])
def test_worker_slices_equal_rows_of_the_full_sampler(replacement, partition):
    labels = torch.arange(800) % 10
    s = WorkerSampler(800, workers=8, local_batch=10, replacement=replacement, partition=partition,
                      labels=labels, generator_seed=5)
    full = s.epoch(3)
    parts = [s.epoch(3, workers=worker_range(p, 4, 8)) for p in range(4)]
    assert [tuple(r) for r in (worker_range(p, 4, 8) for p in range(4))] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    assert torch.equal(s.epoch(3, workers=slice(2, 5)), full[:, 2:5])


def test_worker_range_rejects_uneven_splits():
    with pytest.raises(ValueError, match="evenly"):
        worker_range(0, 3, 8)
    with pytest.raises(ValueError, match="rank"):
        worker_range(4, 4, 8)
