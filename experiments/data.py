"""CIFAR-10 files: locate, verify, decode, download; and the input normalization.

`load_cifar10(root, split)` returns ``(images, labels)``: uint8 tensor (N, 3, 32, 32) in CHW
order and int64 tensor (N,), N = 50,000 ("train") or 10,000 ("test"), in the official record
order (Krizhevsky, 2009). ``root`` holds one of, looked for in this order:

1. ``cifar-10-batches-bin/``   the official binary version, unpacked;
2. ``cifar-10-binary.tar.gz``  its official archive, read member by member straight from the
   tar stream (nothing is unpacked to disk; one pass decodes both splits, about 2 s here);
3. ``cifar-10-batches-py/``    the official python (pickle) version, unpacked;
4. ``cifar-10-python.tar.gz``  its archive, read the same way.

``root`` may also name one of these folders or archives directly. Every file is checked
before it is decoded: binary files against the SHA-1 table `BINARY_SHA1` below (computed on
the real data), python files against the MD5 values published with the official
release (the values torchvision also uses; not recomputed here, since no python-version copy
is at hand). Pickles are read with an unpickler that only admits numpy arrays and plain
containers. Decoded arrays are cached per process (keyed on the resolved path and its size and
modification time), so repeated loads cost one copy.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

try:  # numpy >= 2 moved the module that array pickles name; old pickles name numpy.core
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Training-set per-channel statistics on the 0-255 scale (computed on the 50,000 training images). The
# authors' scripts normalize with std (0.2023, 0.1994, 0.2010) x 255, a widespread mis-copied
# value 0.77-0.82 of the true std; pass std= to reproduce their input scale exactly.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
# MD5 of the archive as served by the official site; repacked copies (such as the one these
# machines hold) differ, so downloads are verified by the SHA-1 of every member instead.
CIFAR10_BINARY_TAR_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"

BINARY_DIR = "cifar-10-batches-bin"
BINARY_TAR = "cifar-10-binary.tar.gz"
PYTHON_DIR = "cifar-10-batches-py"
PYTHON_TAR = "cifar-10-python.tar.gz"

_RECORD_BYTES = 1 + 3 * 32 * 32
_RECORDS_PER_FILE = 10_000
_TRAIN_STEMS = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
_SPLIT_STEMS = {"train": _TRAIN_STEMS, "test": ("test_batch",)}

BINARY_SHA1 = {
    "data_batch_1.bin": "aadd24acce27caa71bf4b10992e9e7b2d74c2540",
    "data_batch_2.bin": "c0ba65cce70568cd57b4e03e9ac8d2a5367c1795",
    "data_batch_3.bin": "1dd00a74ab1d17a6e7d73e185b69dbf31242f295",
    "data_batch_4.bin": "aab85764eb3584312d3c7f65fd2fd016e36a258e",
    "data_batch_5.bin": "26e2849e66a845b7f1e4614ae70f4889ae604628",
    "test_batch.bin": "67eb016db431130d61cd03c7ad570b013799c88c",
}
PYTHON_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}

_HOW_TO_GET = (
    "get the official CIFAR-10 from https://www.cs.toronto.edu/~kriz/cifar.html "
    "(binary version, cifar-10-binary.tar.gz; or call experiments.data.download_cifar10(root)) "
    "and point CIFAR10_DIR or --data-dir at the folder holding it")


class CorruptFileError(ValueError):
    """A CIFAR-10 file whose checksum or size does not match the official release."""


def resolve_cifar10_dir(data_dir: str | os.PathLike | None = None, *, search: bool = False) -> Path:
    """The CIFAR-10 folder; the one place that knows where to look, in this order:

    1. `data_dir`, when given;
    2. env CIFAR10_DIR, when set (tests/conftest.py exports what it found, so notebook kernels and
       subprocesses started by the tests see the same folder);
    3. with `search=True` (command lines, notebooks, benchmarks, tests), the first of ./data, the
       repository's data/ and a shared/data folder beside the repository that holds CIFAR-10;
    4. ./data (where `--download` puts it).
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("CIFAR10_DIR")
    if env:
        return Path(env).expanduser()
    if search:
        repo = Path(__file__).resolve().parents[1]
        for candidate in (Path("data"), repo / "data", repo.parent / "shared" / "data"):
            try:
                _find_source(candidate)
                return candidate
            except (FileNotFoundError, ValueError):
                continue
    return Path("data")


def _find_source(root: Path) -> tuple[str, Path]:
    """(kind, path) with kind in {"bin-dir", "bin-tar", "py-dir", "py-tar"}."""
    if root.is_file():
        if root.name.endswith(".tar.gz") or root.name.endswith(".tgz"):
            return ("py-tar" if "python" in root.name else "bin-tar"), root
        raise ValueError(f"{root} is a file but not a CIFAR-10 .tar.gz archive; {_HOW_TO_GET}")
    if root.name == BINARY_DIR and root.is_dir():
        return "bin-dir", root
    if root.name == PYTHON_DIR and root.is_dir():
        return "py-dir", root
    for kind, name in (("bin-dir", BINARY_DIR), ("bin-tar", BINARY_TAR),
                       ("py-dir", PYTHON_DIR), ("py-tar", PYTHON_TAR)):
        path = root / name
        if (path.is_dir() if kind.endswith("dir") else path.is_file()):
            return kind, path
    raise FileNotFoundError(
        f"no CIFAR-10 in {root.resolve()}: looked for {BINARY_DIR}/, {BINARY_TAR}, {PYTHON_DIR}/ "
        f"and {PYTHON_TAR}; {_HOW_TO_GET}")


def _check(name: str, payload: bytes, kind: str, where: Path) -> None:
    if kind.startswith("bin"):
        expected, actual = BINARY_SHA1[name], hashlib.sha1(payload).hexdigest()
        algo = "SHA-1"
    else:
        expected, actual = PYTHON_MD5[name], hashlib.md5(payload).hexdigest()
        algo = "MD5"
    if actual != expected:
        raise CorruptFileError(
            f"CIFAR-10 file {name} in {where} is corrupt: {algo} {actual}, expected {expected} "
            f"({len(payload)} bytes); delete it and {_HOW_TO_GET}")


def _decode_binary(name: str, payload: bytes, where: Path) -> tuple[np.ndarray, np.ndarray]:
    if len(payload) != _RECORD_BYTES * _RECORDS_PER_FILE:
        raise CorruptFileError(
            f"CIFAR-10 file {name} in {where} has {len(payload)} bytes, expected "
            f"{_RECORD_BYTES * _RECORDS_PER_FILE}; {_HOW_TO_GET}")
    records = np.frombuffer(payload, dtype=np.uint8).reshape(_RECORDS_PER_FILE, _RECORD_BYTES)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0].astype(np.int64)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits numpy array reconstruction and nothing else (no arbitrary code from pickles)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
        ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} from a CIFAR-10 pickle") from None


def _decode_python(name: str, payload: bytes, where: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArrayOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
        entry = {(k.decode() if isinstance(k, bytes) else k): v for k, v in entry.items()}
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as exc:  # any decoding failure means the file is not what it claims to be
        raise CorruptFileError(f"CIFAR-10 file {name} in {where} cannot be decoded ({exc}); "
                               f"{_HOW_TO_GET}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise CorruptFileError(f"CIFAR-10 file {name} in {where} holds data of shape {data.shape} "
                               f"and labels of shape {labels.shape}; expected (n, 3072) and (n,)")
    return data.reshape(-1, 3, 32, 32), labels


def _member_names(kind: str) -> dict[str, str]:
    """File name -> split for every file a split needs."""
    suffix = ".bin" if kind.startswith("bin") else ""
    return {stem + suffix: split for split, stems in _SPLIT_STEMS.items() for stem in stems}


def _read_payloads(kind: str, path: Path, names: Iterable[str]) -> dict[str, bytes]:
    names = list(names)
    if kind.endswith("dir"):
        payloads = {}
        for name in names:
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(f"CIFAR-10 file {name} is missing from {path}; {_HOW_TO_GET}")
            payloads[name] = file.read_bytes()
        return payloads
    folder = BINARY_DIR if kind.startswith("bin") else PYTHON_DIR
    wanted = {f"{folder}/{n}": n for n in names}
    payloads = {}
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar:  # sequential: a gzip stream cannot seek, so read in one pass
                name = wanted.get(member.name.lstrip("./"))
                if name is not None and member.isfile():
                    payloads[name] = tar.extractfile(member).read()
                    if len(payloads) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CorruptFileError(f"CIFAR-10 archive {path} cannot be read ({exc}); {_HOW_TO_GET}") from exc
    missing = [n for n in names if n not in payloads]
    if missing:
        # the official archive holds every file: one that lacks some is incomplete or corrupt
        # (a damaged block can end a tar stream early without an error)
        raise CorruptFileError(f"CIFAR-10 archive {path} is corrupt or incomplete: it holds no "
                               f"{folder}/{missing[0]} ({len(payloads)} of {len(names)} data files "
                               f"found); {_HOW_TO_GET}")
    return payloads


# Up to 3 sources (184 MB each for the full set) stay decoded: the real archive survives a test
# session that also loads an unpacked copy and small fakes.
@functools.lru_cache(maxsize=3)
def _decoded(kind: str, path: str, signature: tuple, verify: bool):
    """{split: read-only numpy (images, labels)}; both splits in one pass over an archive.

    ``signature`` (file sizes and modification times) makes a changed file miss the cache.
    """
    del signature
    where = Path(path)
    splits = _member_names(kind)
    payloads = _read_payloads(kind, where, splits)
    decode = _decode_binary if kind.startswith("bin") else _decode_python
    parts: dict[str, list] = {"train": [], "test": []}
    for name, split in splits.items():
        if verify:
            _check(name, payloads[name], kind, where)
        parts[split].append(decode(name, payloads.pop(name), where))
    out = {}
    for split, pieces in parts.items():
        images = np.concatenate([x for x, _ in pieces])
        labels = np.concatenate([y for _, y in pieces])
        images.flags.writeable = False
        labels.flags.writeable = False
        out[split] = (images, labels)
    return out


def _signature(kind: str, path: Path) -> tuple:
    files = [path] if kind.endswith("tar") else sorted(path.iterdir())
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def load_cifar10(root: str | os.PathLike | None, split: str, *,
                 verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` ("train" or "test") from ``root`` (see the module docstring).

    Returns uint8 images (N, 3, 32, 32) and int64 labels (N,) as fresh CPU tensors.
    ``verify=False`` skips the checksums (for hand-made test files); sizes are still checked.
    Raises FileNotFoundError naming a missing file, CorruptFileError (a ValueError) naming a
    file whose checksum or size is wrong.
    """
    if split not in _SPLIT_STEMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = resolve_cifar10_dir(root)
    kind, path = _find_source(root)
    path = path.resolve()
    images, labels = _decoded(kind, str(path), _signature(kind, path), bool(verify))[split]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def clear_cache() -> None:
    """Drop the per-process cache of decoded arrays."""
    _decoded.cache_clear()


def normalize(images: torch.Tensor, mean: Iterable[float] = CIFAR10_MEAN,
              std: Iterable[float] = CIFAR10_STD, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(images - mean) / std per channel; images (..., C, H, W) uint8 or float on the 0-255 scale.

    Returns ``dtype`` on the images' device. mean and std are 0-255-scale constants (default:
    the CIFAR-10 training-set statistics).
    """
    if images.dim() < 3:
        raise ValueError(f"images must have shape (..., C, H, W), got {tuple(images.shape)}")
    mean_t = torch.as_tensor(tuple(mean), dtype=dtype, device=images.device)
    std_t = torch.as_tensor(tuple(std), dtype=dtype, device=images.device)
    if mean_t.numel() != images.shape[-3] or std_t.numel() != images.shape[-3]:
        raise ValueError(f"mean/std have {mean_t.numel()}/{std_t.numel()} entries for "
                         f"{images.shape[-3]} channels")
    return (images.to(dtype) - mean_t[:, None, None]) / std_t[:, None, None]


def balanced_subset(images: torch.Tensor, labels: torch.Tensor, n: int, *,
                    num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced subset of ``n`` examples in the original record order: the first
    n // C examples of every class, and one more of each of the first n % C classes (so class
    counts differ by at most one). For n divisible by C this is the first n / C of each class."""
    if not 0 < n <= labels.shape[0]:
        raise ValueError(f"subset size must be in [1, {labels.shape[0]}], got {n}")
    per_class, extra = divmod(n, num_classes)
    picked = []
    for c in range(num_classes):
        want = per_class + (1 if c < extra else 0)
        where = torch.nonzero(labels == c).flatten()
        if where.numel() < want:
            raise ValueError(f"class {c} has only {where.numel()} examples, {want} requested")
        picked.append(where[:want])
    idx = torch.sort(torch.cat(picked)).values
    return images[idx], labels[idx]


def cifar_subset(root: str | os.PathLike | None, n: int, *, image_size: int = 16, split: str = "train",
                 dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """n real CIFAR-10 images of ``split``, n / 10 per class, normalized per channel and avg-pooled.

    Returns images (n, 3, image_size, image_size) in ``dtype`` and int64 labels (n,): the first n / 10
    images of every class in record order (`balanced_subset`), so deterministic and nested in n.
    """
    if n < len(CLASSES) or n % len(CLASSES):
        raise ValueError(f"n must be a positive multiple of {len(CLASSES)} (class-balanced), got {n}")
    if not 0 < image_size <= 32 or 32 % image_size:
        raise ValueError(f"image_size must divide 32, got {image_size}")
    images, labels = balanced_subset(*load_cifar10(root, split), n, num_classes=len(CLASSES))
    x = normalize(images, dtype=dtype)
    if image_size != 32:
        x = torch.nn.functional.avg_pool2d(x, 32 // image_size)
    return x, labels


def verify_binary_archive(path: str | os.PathLike) -> None:
    """Check every data member of a binary-version archive against BINARY_SHA1 (raises if not)."""
    path = Path(path)
    payloads = _read_payloads("bin-tar", path, BINARY_SHA1)
    for name, payload in payloads.items():
        _check(name, payload, "bin-tar", path)


def download_cifar10(root: str | os.PathLike, *, url: str = CIFAR10_URL, force: bool = False) -> Path:
    """Download the binary-version archive into ``root`` (only when asked); returns its path.

    The file is streamed to a temporary file in ``root``, every member's SHA-1 is verified, and
    only then is it renamed to ``cifar-10-binary.tar.gz`` (atomic on one file system). An
    existing valid archive is kept unless ``force``.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    target = root / BINARY_TAR
    if target.exists() and not force:
        verify_binary_archive(target)
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=".cifar-10-binary.", suffix=".part", dir=root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        verify_binary_archive(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
