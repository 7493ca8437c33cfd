"""Device data set: augmentation, label noise, target noise, subsets, synthetic data.

Budget: about 3 s. Random draws use explicit generators with fixed seeds; each statistical
tolerance is stated where it is used.
"""
import math

import pytest
import torch

from experiments.data import CIFAR10_MEAN, CIFAR10_STD, normalize
from experiments.datasets import (DeviceDataset, flip_labels, noisy_one_hot, random_crop_flip,
                                  subset, synthetic_cifar)


def _random_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # no zeros


def _placements(original, out, padding):
    """All (oy, ox, flip) whose crop of the zero-padded original equals ``out``."""
    h, w = original.shape[-2:]
    padded = torch.nn.functional.pad(original, (padding,) * 4)
    found = []
    for oy in range(2 * padding + 1):
        for ox in range(2 * padding + 1):
            window = padded[:, oy:oy + h, ox:ox + w]
            for flip in (False, True):
                if torch.equal(window.flip(-1) if flip else window, out):
                    found.append((oy, ox, flip))
    return found


def test_augmented_batch_is_a_padded_crop_of_the_image_possibly_flipped():
    images = _random_images(48)
    data = DeviceDataset(images, torch.zeros(48, dtype=torch.int64), device="cpu")
    idx = torch.arange(48).flip(0)
    x, _ = data.batch(idx, augment=True, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(CIFAR10_MEAN)[:, None, None]
    std = torch.tensor(CIFAR10_STD)[:, None, None]
    raw = (x.double() * std + mean).round().to(torch.uint8)  # undo normalize
    for i in range(48):
        original = images[idx[i]]
        assert len(_placements(original, raw[i], 4)) == 1
        # multiset of pixel values: the non-zero ones are original pixels, each used at most once
        kept = raw[i][raw[i] != 0]
        counts_out = torch.bincount(kept.long(), minlength=256)
        counts_in = torch.bincount(original.reshape(-1).long(), minlength=256)
        assert bool((counts_out <= counts_in).all())


def test_crop_offsets_and_flips_are_uniform():
    n, padding, size = 3000, 4, 8
    images = _random_images(n, size=size, seed=2)
    out = random_crop_flip(images, generator=torch.Generator().manual_seed(3), padding=padding)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    span = 2 * padding + 1
    # match[oy, ox, flip, i]: does that placement reproduce image i's output? (vectorized _placements)
    match = torch.zeros(span, span, 2, n, dtype=torch.bool)
    for oy in range(span):
        for ox in range(span):
            window = padded[:, :, oy:oy + size, ox:ox + size]
            match[oy, ox, 0] = (window == out).flatten(1).all(1)
            match[oy, ox, 1] = (window.flip(-1) == out).flatten(1).all(1)
    assert torch.equal(match.flatten(0, 2).sum(0), torch.ones(n, dtype=torch.long))  # one each
    oy = match.any(dim=(1, 2)).double().argmax(0)
    flips = match[:, :, 1].any(dim=(0, 1)).double()
    # Binomial(3000, 1/2) flips: sd of the rate 0.0091; 4 sd = 0.037 (false alarm ~ 6e-5).
    assert abs(flips.mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    # each of the 9 vertical offsets has rate 1/9, sd 0.0057; 4.5 sd (9 tests, Bonferroni).
    rates = torch.bincount(oy.long(), minlength=span).double() / n
    assert (rates - 1 / 9).abs().max().item() < 4.5 * math.sqrt((1 / 9) * (8 / 9) / n)


def test_no_augmentation_is_plain_normalization_and_keeps_index_shape():
    images, labels = synthetic_cifar(40, seed=0)
    data = DeviceDataset(images, labels, device="cpu")
    idx = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    x, y = data.batch(idx, augment=False)
    assert x.shape == (2, 4, 3, 32, 32) and y.shape == (2, 4)
    assert torch.equal(x, normalize(images[idx]))
    assert torch.equal(y, labels[idx])


def test_same_generator_seed_gives_the_same_batch():
    images, labels = synthetic_cifar(64, seed=1)
    data = DeviceDataset(images, labels, device="cpu")
    idx = torch.arange(64).reshape(4, 16)
    a = data.batch(idx, augment=True, generator=torch.Generator().manual_seed(7))[0]
    b = data.batch(idx, augment=True, generator=torch.Generator().manual_seed(7))[0]
    c = data.batch(idx, augment=True, generator=torch.Generator().manual_seed(8))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="Generator"):
        data.batch(idx, augment=True, generator=None)


def test_dataset_rejects_bad_inputs():
    images, labels = synthetic_cifar(10, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        DeviceDataset(images.float(), labels)
    with pytest.raises(ValueError, match="labels must lie"):
        DeviceDataset(images, labels + 10)
    with pytest.raises(ValueError, match="one entry per channel"):
        DeviceDataset(images[:, :1], labels)


def test_eval_batches_cover_the_set_in_order():
    images, labels = synthetic_cifar(25, seed=0)
    data = DeviceDataset(images, labels)
    ys = [y for _, y in data.eval_batches(10)]
    assert [len(y) for y in ys] == [10, 10, 5] and torch.equal(torch.cat(ys), labels)


def test_flip_labels_rate_and_uniform_other_class():
    n, p, c = 200_000, 0.1, 10
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    y1, y2 = flip_labels(y, p, c, g), flip_labels(y, p, c, g)
    flipped = y1 != y
    # Binomial(n, p): sd of the rate sqrt(p(1-p)/n) = 6.7e-4; 5 sd.
    assert abs(flipped.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # a flip goes to one of the 9 other classes uniformly: shift (y' - y) mod 10 in 1..9
    shift = (y1[flipped] - y[flipped]) % c
    assert int(shift.min()) >= 1
    m = flipped.sum().item()
    rates = torch.bincount(shift, minlength=c)[1:].double() / m
    assert (rates - 1 / 9).abs().max().item() < 4.5 * math.sqrt((1 / 9) * (8 / 9) / m)
    # redrawn at every draw: two draws agree only where both kept the label or coincide
    assert (y1 != y2).double().mean().item() > 0.15
    assert torch.equal(flip_labels(y, 0.0, c, g), y)


def test_noisy_one_hot_variance_matches_sigma():
    n, c, sigma = 100_000, 10, 0.3
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(0))
    t = noisy_one_hot(y, sigma, c, torch.Generator().manual_seed(1), dtype=torch.float64)
    resid = (t - torch.nn.functional.one_hot(y, c)).reshape(-1)
    m = resid.numel()
    # (m - 1) s^2 / sigma^2 ~ chi2(m - 1): s^2 / sigma^2 has sd sqrt(2 / (m - 1)) = 1.4e-3; 5 sd.
    assert abs(resid.var().item() / sigma**2 - 1) < 5 * math.sqrt(2 / (m - 1))
    assert abs(resid.mean().item()) < 5 * sigma / math.sqrt(m)


def test_subset_first_n_and_balanced():
    images, labels = synthetic_cifar(1000, seed=3)
    x, y = subset(images, labels, 100, balanced=False)
    assert torch.equal(x, images[:100]) and torch.equal(y, labels[:100])
    xb, yb = subset(images, labels, 50, balanced=True)
    assert torch.equal(torch.bincount(yb, minlength=10), torch.full((10,), 5))
    expected = torch.sort(torch.cat([torch.nonzero(labels == k).flatten()[:5] for k in range(10)])).values
    assert torch.equal(xb, images[expected]) and torch.equal(yb, labels[expected])
    with pytest.raises(ValueError, match="divisible"):
        subset(images, labels, 55, balanced=True)
    with pytest.raises(ValueError, match="class 0 has only"):
        subset(images, labels, 1000, balanced=True, num_classes=5)


def test_synthetic_cifar_is_deterministic_balanced_and_learnable():
    x, y = synthetic_cifar(2000, seed=5)
    x2, y2 = synthetic_cifar(2000, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(synthetic_cifar(2000, seed=6)[0], x)
    assert x.dtype == torch.uint8 and torch.equal(torch.bincount(y), torch.full((10,), 200))
    # learnable: nearest class mean fitted on 1000 images classifies the other 1000 well,
    # while the pixel noise alone (sd 40) would leave it at chance (10 %).
    z = x.double().reshape(2000, -1)
    means = torch.stack([z[:1000][y[:1000] == k].mean(0) for k in range(10)])
    pred = torch.cdist(z[1000:], means).argmin(1)
    assert (pred == y[1000:]).double().mean().item() > 0.9


def test_per_worker_generators_give_each_row_the_draws_of_its_own_batch():
    # the batched path (one gather for K rows, row k drawing from generator k) against K
    # separate batches from generators with the same seeds: identical bits, and the
    # generators end in the same states (the next draws agree too)
    images = _random_images(40)
    data = DeviceDataset(images, torch.arange(40) % 10, device="cpu")
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(4))[:24].reshape(3, 8)
    gens_a = [torch.Generator().manual_seed(10 + k) for k in range(3)]
    gens_b = [torch.Generator().manual_seed(10 + k) for k in range(3)]
    x, y = data.batch(idx, augment=True, generator=gens_a)
    for k in range(3):
        xk, yk = data.batch(idx[k], augment=True, generator=gens_b[k])
        assert torch.equal(x[k], xk) and torch.equal(y[k], yk)
    for ga, gb in zip(gens_a, gens_b):
        assert torch.equal(ga.get_state(), gb.get_state())
    assert not torch.equal(x[0], x[1])   # rows differ (different images and draws)
    with pytest.raises(ValueError, match="one generator per row"):
        data.batch(idx, augment=True, generator=gens_a[:2])


def test_pack_round_trip_and_corruption_refused(tmp_path):
    from experiments.data import CorruptFileError
    from experiments.datasets import is_pack, read_pack, write_pack
    tr = _random_images(30), torch.arange(30) % 10
    te = _random_images(10, seed=5), torch.arange(10) % 10
    assert not is_pack(tmp_path)
    manifest = write_pack(tmp_path, tr, te, source="test")
    assert is_pack(tmp_path) and manifest["class_counts"]["train"] == [3] * 10
    (a, b), (c, d) = read_pack(tmp_path)
    assert torch.equal(a, tr[0]) and torch.equal(b, tr[1]) and torch.equal(c, te[0]) and torch.equal(d, te[1])
    assert a.dtype == torch.uint8 and b.dtype == torch.int64
    path = tmp_path / "train_images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF   # one pixel altered: the file still parses, only its digest tells
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError, match="train_images.npy: SHA-256 differs"):
        read_pack(tmp_path)
    path.unlink()
    with pytest.raises(CorruptFileError, match="train_images.npy: missing"):
        read_pack(tmp_path)
