"""Worker samplers: coverage, disjointness, determinism, non-IID shards, slicing.

Budget: under 1 s.
"""
import math

import pytest
import torch

from experiments.sampling import REGIMES, WorkerSampler, epoch_generator, node_shards, worker_range


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


# ---- node shards for the Local SGD convergence study (Qin, Etesami & Uribe, TMLR 2024)

def _balanced_labels(per_class, classes=10, seed=0):
    labels = torch.arange(per_class * classes) % classes
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _is_partition(shards, n):
    return torch.equal(torch.sort(shards.reshape(-1)).values, torch.arange(n))


def test_sorted_shards_give_ten_one_label_and_ten_two_label_nodes():
    labels = _balanced_labels(32)                    # N = 320, m = 16 per node
    shards = node_shards(labels, 20, "sorted")
    assert shards.shape == (20, 16) and _is_partition(shards, 320)
    one = two = 0
    for j in range(20):
        counts = torch.bincount(labels[shards[j]], minlength=10)
        if j % 2 == 0:   # even nodes: all 16 of class j / 2
            assert counts[j // 2] == 16
            one += 1
        else:            # odd nodes: 8 of class (j - 1) / 2 and 8 of the next (node 19: classes 9 and 0)
            assert counts[(j - 1) // 2] == 8 and counts[((j + 1) // 2) % 10] == 8
            two += 1
        assert int((counts > 0).sum()) == (1 if j % 2 == 0 else 2)
    assert (one, two) == (10, 10)
    # full CIFAR-10 sizes (5,000 per class): the same ten/ten split, 2,500 images per node
    big = node_shards(torch.arange(50_000) % 10, 20, "sorted")
    n_labels = [len(torch.unique(big[j] % 10)) for j in range(20)]
    assert n_labels == [1, 2] * 10
    assert torch.equal(node_shards(labels, 20, "sorted"), shards)  # deterministic, draws nothing


def test_iid_shards_are_a_seeded_uniform_partition():
    labels = _balanced_labels(32)
    a, b, c = (node_shards(labels, 20, "iid", seed=s) for s in (3, 3, 4))
    assert a.shape == (20, 16) and _is_partition(a, 320)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a node's 16 labels are a draw without replacement from 32 x 10: the mean number of
    # distinct labels is 10 (1 - C(288, 16) / C(320, 16)) = 8.2; every node has >= 4 (P(< 4) ~ 1e-6)
    distinct = [len(torch.unique(labels[a[j]])) for j in range(20)]
    assert min(distinct) >= 4 and 7.0 < sum(distinct) / 20 < 9.4


def test_mixed_shards_hold_the_sorted_labels_plus_an_iid_part():
    labels = _balanced_labels(32)
    shards = node_shards(labels, 20, "mixed", similarity=0.5, seed=1)
    assert shards.shape == (20, 16) and _is_partition(shards, 320)
    sorted_part, iid_part = shards[:, :8], shards[:, 8:]
    for j in range(20):
        counts = torch.bincount(labels[sorted_part[j]], minlength=10)
        if j % 2 == 0:
            assert counts[j // 2] == 8
        else:
            assert counts[(j - 1) // 2] == 4 and counts[((j + 1) // 2) % 10] == 4
    # the pool takes exactly 2 q = 16 samples of every class
    assert torch.equal(torch.bincount(labels[iid_part.reshape(-1)], minlength=10), torch.full((10,), 16))
    # and spreads them: nodes see more labels than in "sorted" (mean distinct labels over 8
    # pooled draws from 160 is ~5.7; the sorted part adds at most 2)
    distinct = sum(len(torch.unique(labels[shards[j]])) for j in range(20)) / 20
    assert distinct > 4.0
    assert torch.equal(node_shards(labels, 20, "mixed", similarity=0.0), node_shards(labels, 20, "sorted"))


def test_node_shards_reject_bad_input_with_clear_errors():
    labels = _balanced_labels(32)
    with pytest.raises(ValueError, match="unknown regime 'dirichlet'"):
        node_shards(labels, 20, "dirichlet")
    with pytest.raises(ValueError, match="cannot be split into 400 equal"):
        node_shards(labels, 400, "iid")          # more nodes than samples
    with pytest.raises(ValueError, match="cannot be split into 21"):
        node_shards(labels, 21, "iid")
    unbalanced = labels.clone()
    unbalanced[torch.nonzero(labels == 3).flatten()[:2]] = 4
    with pytest.raises(ValueError, match="every class holding"):
        node_shards(unbalanced, 20, "sorted")
    with pytest.raises(ValueError, match="nodes = 2 x classes"):
        node_shards(labels, 10, "sorted")        # 10 nodes over 10 classes: no two-label nodes
    with pytest.raises(ValueError, match="integer"):
        node_shards(labels, 20, "mixed", similarity=0.3)   # 0.3 x 16 is not an integer
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        node_shards(labels, 20, "mixed", similarity=1.5)
    assert set(REGIMES) == {"iid", "sorted", "mixed"}


def test_shards_partition_sampler_uses_every_sample_once_per_epoch():
    labels = _balanced_labels(32)
    shards = node_shards(labels, 20, "mixed", similarity=0.5, seed=2)
    s = WorkerSampler(320, workers=20, local_batch=8, replacement=False, partition="shards",
                      shards=shards, generator_seed=5)
    assert s.shape == (2, 20, 8)
    e3, e4 = s.epoch(3), s.epoch(4)
    for e in (e3, e4):
        assert _is_partition(e.reshape(-1, 1), 320)          # each of the 320 exactly once
        for j in range(20):                                   # node j only ever sees its shard
            assert sorted(e[:, j].reshape(-1).tolist()) == sorted(shards[j].tolist())
    assert not torch.equal(e3, e4)                            # reshuffled within the shard
    with pytest.raises(ValueError, match="shape \\(20, m >= 1\\)"):
        WorkerSampler(320, workers=20, local_batch=8, replacement=False, partition="shards")
    with pytest.raises(ValueError, match="no full step fits"):
        WorkerSampler(320, workers=20, local_batch=32, replacement=False, partition="shards", shards=shards)
    with pytest.raises(ValueError, match="lie in"):
        WorkerSampler(100, workers=20, local_batch=8, replacement=False, partition="shards", shards=shards)
