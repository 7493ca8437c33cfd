"""CIFAR-10 files: facts of the real data, checksums, layouts, download, normalization.

Budget: about 10 s (one 2 s pass over the real archive, shared through the loader's cache;
one 184 MB folder written from it; one local 'download').
"""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from experiments import data
from experiments.data import (BINARY_SHA1, CIFAR10_MEAN, CIFAR10_STD, CorruptFileError,
                              download_cifar10, load_cifar10, normalize, resolve_cifar10_dir)

_STEMS = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


@pytest.fixture(scope="module")
def real(cifar10_dir):
    return {split: load_cifar10(cifar10_dir, split) for split in ("train", "test")}


def _record_bytes(images: torch.Tensor, labels: torch.Tensor) -> bytes:
    """Re-encode decoded arrays in the binary layout: label byte, then R, G, B planes."""
    rec = np.concatenate([labels.numpy().astype(np.uint8)[:, None],
                          images.reshape(len(labels), -1).numpy()], axis=1)
    return rec.tobytes()


@pytest.fixture(scope="module")
def binary_folder(real, tmp_path_factory):
    """An unpacked cifar-10-batches-bin/ re-encoded from the arrays decoded from the archive."""
    root = tmp_path_factory.mktemp("cifar_bin")
    folder = root / data.BINARY_DIR
    folder.mkdir()
    (x, y), (xt, yt) = real["train"], real["test"]
    for i, stem in enumerate(_STEMS[:5]):
        sl = slice(10_000 * i, 10_000 * (i + 1))
        (folder / f"{stem}.bin").write_bytes(_record_bytes(x[sl], y[sl]))
    (folder / "test_batch.bin").write_bytes(_record_bytes(xt, yt))
    return root


def test_real_train_split_matches_known_facts(real):
    x, y = real["train"]
    assert x.shape == (50_000, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert int(y[0]) == 6  # frog (data/README.md)
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 5000))
    # exact per-channel moments from the 256-bin histogram of each colour plane
    levels = torch.arange(256, dtype=torch.float64)
    hist = torch.stack([torch.bincount(x[:, c].reshape(-1), minlength=256) for c in range(3)]).double()
    n = hist.sum(1)
    mean = hist @ levels / n
    std = ((hist @ levels**2 / n - mean**2) * n / (n - 1)).sqrt()
    # README gives the statistics to 3 decimals: agreement to 1e-3 means the planes are
    # decoded in R, G, B order and CHW layout (any channel swap moves the means by > 3).
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(std, torch.tensor(CIFAR10_STD, dtype=torch.float64), atol=1e-3)


def test_real_test_split_matches_known_facts(real):
    x, y = real["test"]
    assert x.shape == (10_000, 3, 32, 32)
    assert int(y[0]) == 3  # cat
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), 1000))


def test_repeated_load_is_a_fresh_copy_of_the_cached_arrays(cifar10_dir, real):
    x, y = load_cifar10(cifar10_dir, "test")
    x[0].zero_()
    y[0] = 9
    x2, y2 = load_cifar10(cifar10_dir, "test")
    assert torch.equal(x2, real["test"][0]) and int(y2[0]) == 3
    source = cifar10_dir / data.BINARY_TAR
    if not source.exists():
        source = cifar10_dir / data.BINARY_DIR
    # the archive or folder may be named directly; it resolves to the same cache entry
    assert torch.equal(load_cifar10(source, "test")[1], real["test"][1])


def test_decoded_arrays_reencode_to_the_official_sha1(binary_folder):
    # The re-encoded files hash to the README's SHA-1 table: the decoder lost and reordered nothing.
    for name, sha in BINARY_SHA1.items():
        assert hashlib.sha1((binary_folder / data.BINARY_DIR / name).read_bytes()).hexdigest() == sha


def test_unpacked_folder_and_archive_give_identical_arrays(binary_folder, real):
    for split in ("train", "test"):
        x, y = load_cifar10(binary_folder, split)  # verify=True: checks every SHA-1 again
        assert torch.equal(x, real[split][0]) and torch.equal(y, real[split][1])
    # the folder itself may be given too
    assert torch.equal(load_cifar10(binary_folder / data.BINARY_DIR, "test")[1], real["test"][1])


def _linked_copy(src_root, dst_root, skip=()):
    folder = dst_root / data.BINARY_DIR
    folder.mkdir(parents=True)
    for name in BINARY_SHA1:
        if name not in skip:
            os.symlink(src_root / data.BINARY_DIR / name, folder / name)
    return folder


def test_one_flipped_byte_is_reported_with_the_file_name(binary_folder, tmp_path):
    folder = _linked_copy(binary_folder, tmp_path, skip=("data_batch_3.bin",))
    payload = bytearray((binary_folder / data.BINARY_DIR / "data_batch_3.bin").read_bytes())
    payload[123_457] ^= 0x01
    (folder / "data_batch_3.bin").write_bytes(bytes(payload))
    with pytest.raises(CorruptFileError, match=r"data_batch_3\.bin.*corrupt"):
        load_cifar10(tmp_path, "train")
    assert isinstance(CorruptFileError("x"), ValueError)


def test_truncated_file_is_reported_even_without_checksums(binary_folder, tmp_path):
    folder = _linked_copy(binary_folder, tmp_path, skip=("test_batch.bin",))
    whole = (binary_folder / data.BINARY_DIR / "test_batch.bin").read_bytes()
    (folder / "test_batch.bin").write_bytes(whole[:-1])
    with pytest.raises(CorruptFileError, match=r"test_batch\.bin in .* has 30729999 bytes"):
        load_cifar10(tmp_path, "test", verify=False)


def test_missing_file_is_named(binary_folder, tmp_path):
    _linked_copy(binary_folder, tmp_path, skip=("data_batch_5.bin",))
    with pytest.raises(FileNotFoundError, match=r"data_batch_5\.bin is missing"):
        load_cifar10(tmp_path, "train")


def test_empty_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar\.html.*CIFAR10_DIR"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "validation")


def _write_python_layout(root, real, per_file=7, protocols=(2, 4, 4, 4, 4, 4)):
    """A tiny fake of cifar-10-batches-py/: the first ``per_file`` records of each real file."""
    folder = root / data.PYTHON_DIR
    folder.mkdir(parents=True)
    (x, y), (xt, yt) = real["train"], real["test"]
    expected = {"train": ([], []), "test": ([], [])}
    for i, stem in enumerate(_STEMS):
        xs, ys = (xt, yt) if stem == "test_batch" else (x[10_000 * i:], y[10_000 * i:])
        xs, ys = xs[:per_file], ys[:per_file]
        split = "test" if stem == "test_batch" else "train"
        expected[split][0].append(xs)
        expected[split][1].append(ys)
        # Python-2 files decode with str keys, Python-3 pickles of bytes keys give bytes: try both.
        key = (lambda k: k) if protocols[i] == 2 else (lambda k: k.encode())
        entry = {key("batch_label"): "fake", key("data"): xs.reshape(per_file, -1).numpy(),
                 key("labels"): ys.tolist()}
        (folder / stem).write_bytes(pickle.dumps(entry, protocol=protocols[i]))
    return {s: (torch.cat(a), torch.cat(b)) for s, (a, b) in expected.items()}


def test_python_pickle_layout_decodes_like_the_binary_layout(real, tmp_path):
    expected = _write_python_layout(tmp_path / "unpacked", real)
    for split in ("train", "test"):
        x, y = load_cifar10(tmp_path / "unpacked", split, verify=False)
        assert torch.equal(x, expected[split][0]) and torch.equal(y, expected[split][1])
    # the same files packed as cifar-10-python.tar.gz
    (tmp_path / "packed").mkdir()
    with tarfile.open(tmp_path / "packed" / data.PYTHON_TAR, "w:gz") as tar:
        tar.add(tmp_path / "unpacked" / data.PYTHON_DIR, arcname=data.PYTHON_DIR)
    x, y = load_cifar10(tmp_path / "packed", "train", verify=False)
    assert torch.equal(x, expected["train"][0]) and torch.equal(y, expected["train"][1])
    # with checksums on, the fake fails the official MD5 of its first file
    with pytest.raises(CorruptFileError, match=r"data_batch_1 .*MD5"):
        load_cifar10(tmp_path / "unpacked", "train")


def test_pickles_that_run_code_are_refused(tmp_path, real):
    _write_python_layout(tmp_path, real)
    (tmp_path / data.PYTHON_DIR / "data_batch_2").write_bytes(pickle.dumps({"data": os.getcwd}))
    with pytest.raises(CorruptFileError, match=r"data_batch_2.*refusing to load posix\.getcwd"):
        load_cifar10(tmp_path, "train", verify=False)


def test_resolve_dir_prefers_argument_then_env_then_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    assert resolve_cifar10_dir("/somewhere") == data.Path("/somewhere")
    assert resolve_cifar10_dir() == tmp_path
    monkeypatch.delenv("CIFAR10_DIR")
    assert resolve_cifar10_dir() == data.Path("data")


def test_download_from_a_local_url_verifies_and_writes_atomically(cifar10_dir, tmp_path):
    archive = cifar10_dir / data.BINARY_TAR
    if not archive.exists():  # only the unpacked folder is at hand: pack it as the official archive
        archive = tmp_path / "src" / data.BINARY_TAR
        archive.parent.mkdir()
        with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
            tar.add(cifar10_dir / data.BINARY_DIR, arcname=data.BINARY_DIR)
    path = download_cifar10(tmp_path / "dl", url=archive.resolve().as_uri())
    assert path == tmp_path / "dl" / data.BINARY_TAR
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [data.BINARY_TAR]
    # download_cifar10 verified every member's SHA-1 before the rename; the bytes are the source's
    assert path.stat().st_size == archive.stat().st_size


def test_download_of_a_bad_archive_leaves_nothing_behind(monkeypatch, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{data.BINARY_DIR}/data_batch_1.bin")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url: io.BytesIO(buf.getvalue()))
    with pytest.raises(CorruptFileError, match=r"corrupt or incomplete: it holds no cifar-10-batches-bin/data_batch_2\.bin"):
        download_cifar10(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_normalize_is_per_channel_standardization_on_the_0_255_scale(real):
    x = real["train"][0][:256]
    z = normalize(x)
    assert z.dtype == torch.float32 and z.shape == x.shape and z.device == x.device
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(CIFAR10_STD, dtype=torch.float64)[:, None, None]
    expected = (x.double() - mean) / std
    assert torch.allclose(normalize(x, dtype=torch.float64), expected, rtol=0, atol=1e-12)
    assert torch.allclose(z.double(), expected, rtol=0, atol=1e-5)  # float32 rounding
    # mean and std are the training-set statistics, so the normalized set has mean 0 and
    # std 1 exactly when they are (linearity; the statistics are tested above).
    with pytest.raises(ValueError, match="channels"):
        normalize(x[:, :2])
