"""Device-resident image data: batched augmentation, label noise, subsets, synthetic data.

The whole (sub)set lives on the training device as uint8 (N, 3, 32, 32) plus int64 labels;
a batch is a gather by index, an optional random crop + flip done for the whole batch at once,
and a normalization. Every random draw comes from an explicit ``torch.Generator``; draws are
made on the generator's device and moved to the data's device, so a CPU generator serves a
GPU data set and a run is reproducible across devices.

Conventions:
- augmentation (He et al., 2016; the authors' torchvision pipeline): pad 4 zero pixels on each
  side of the raw 0-255 image, crop a uniformly placed 32x32 window, flip left-right with
  probability 1/2; then normalize, so padding becomes -mean/std as in torchvision.
- label noise (Blanc et al., 2020; the authors' LabelNoiseLoss): each label is kept with
  probability 1 - p and otherwise replaced by one of the OTHER num_classes - 1 classes
  uniformly, redrawn at every draw.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from experiments.data import CIFAR10_MEAN, CIFAR10_STD, CorruptFileError, balanced_subset


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def draw_crop_flip(n: int, *, generator: torch.Generator | None, padding: int = 4,
                   flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random draws of `random_crop_flip` for n images: (oy, ox, flips), each (n,), drawn on
    the generator's device in this order (row offsets, column offsets, flips)."""
    dev = _draw_device(generator)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev)
    flips = torch.rand(n, generator=generator, device=dev) < 0.5 if flip \
        else torch.zeros(n, dtype=torch.bool, device=dev)
    return oy, ox, flips


def crop_flip(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flips: torch.Tensor, *,
              padding: int = 4) -> torch.Tensor:
    """Crop each image of (B, C, H, W) at offsets (oy, ox) of its zero-padded copy and flip it
    left-right where `flips`; one gather over the padded batch, on the images' device."""
    b, c, h, w = images.shape
    dev = images.device
    oy, ox, flips = oy.to(dev), ox.to(dev), flips.to(dev)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    rows = oy[:, None] + torch.arange(h, device=dev)                 # (B, H)
    cols = ox[:, None] + torch.arange(w, device=dev)                 # (B, W)
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, hp * wp).gather(2, flat).reshape(b, c, h, w)


def random_crop_flip(images: torch.Tensor, *, generator: torch.Generator | None,
                     padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with ``padding`` zero pixels and random horizontal flip, per image.

    images: (B, C, H, W) of any dtype (uint8 in the pipeline); returns the same shape and
    dtype. Crop offsets are uniform on {0, ..., 2 padding} in each axis; flips have
    probability 1/2. Implemented as one gather over the padded batch.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    oy, ox, flips = draw_crop_flip(images.shape[0], generator=generator, padding=padding, flip=flip)
    return crop_flip(images, oy, ox, flips, padding=padding)


def flip_labels(y: torch.Tensor, p: float, num_classes: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """Labels with flip noise: with probability p each label moves to a different class.

    The new class is uniform over the num_classes - 1 others (the authors' convention), so
    P(y' = y) = 1 - p and P(y' = c) = p / (num_classes - 1) for each c != y. y: int64 (...).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    if num_classes < 2:
        raise ValueError("label flipping needs at least 2 classes")
    if p == 0.0:
        return y.clone()
    dev = _draw_device(generator)
    flip = torch.rand(y.shape, generator=generator, device=dev).to(y.device) < p
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device=dev).to(y.device)
    return torch.where(flip, (y + shift) % num_classes, y)


def noisy_one_hot(y: torch.Tensor, sigma: float, num_classes: int,
                  generator: torch.Generator | None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot targets (..., num_classes) plus i.i.d. N(0, sigma^2) noise, for squared loss."""
    if sigma < 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    target = torch.nn.functional.one_hot(y, num_classes).to(dtype)
    if sigma == 0:
        return target
    noise = torch.randn(target.shape, generator=generator, dtype=dtype, device=_draw_device(generator))
    return target + sigma * noise.to(target.device)


class DeviceDataset:
    """uint8 images (N, C, H, W) and int64 labels (N,) held on ``device``.

    ``batch(indices, augment=..., generator=...)`` returns normalized float images
    (..., B, C, H, W) and labels (..., B) for an index tensor of shape (..., B), such as a
    (K, B_loc) slice of a WorkerSampler epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device | str = "cpu",
                 num_classes: int = 10, mean: Iterable[float] = CIFAR10_MEAN,
                 std: Iterable[float] = CIFAR10_STD, dtype: torch.dtype = torch.float32):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        mean, std = tuple(mean), tuple(std)
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean and std need one entry per channel ({images.shape[1]})")
        self.images = images.to(device)
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.num_classes = num_classes
        self.mean, self.std, self.dtype = mean, std, dtype
        # the constants of `normalize` on the device once: building them per batch would copy
        # from the host, and a blocking host-to-device copy synchronizes the GPU at every step
        self._mean_t = torch.as_tensor(mean, dtype=dtype, device=self.images.device)[:, None, None]
        self._std_t = torch.as_tensor(std, dtype=dtype, device=self.images.device)[:, None, None]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(self, indices: torch.Tensor, *, augment: bool,
              generator: torch.Generator | Sequence[torch.Generator] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for ``indices`` (..., B): x float (..., B, C, H, W) normalized, y int64 (..., B).

        `generator` draws the augmentation; a sequence of generators, one per row of a 2-D
        (K, B) `indices`, gives row k its own stream (the draws of `batch(indices[k],
        generator=generator[k])`, all rows then cropped in one gather).
        """
        if augment and generator is None:
            raise ValueError("augment=True needs an explicit torch.Generator")
        idx = indices.to(self.device, torch.int64)
        flat = idx.reshape(-1)
        x = self.images.index_select(0, flat)
        if augment and isinstance(generator, torch.Generator):
            x = random_crop_flip(x, generator=generator)
        elif augment:
            if idx.dim() != 2 or len(generator) != idx.shape[0]:
                raise ValueError(f"one generator per row of (K, B) indices needed, got "
                                 f"{len(generator)} for indices {tuple(idx.shape)}")
            draws = [draw_crop_flip(idx.shape[1], generator=g) for g in generator]
            x = crop_flip(x, *(torch.cat(parts) for parts in zip(*draws)))
        x = (x.to(self.dtype) - self._mean_t) / self._std_t     # = normalize(x, mean, std), no host copy
        return x.reshape(*idx.shape, *x.shape[1:]), self.labels.index_select(0, flat).reshape(idx.shape)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive un-augmented batches covering the data set once, in order."""
        for start in range(0, len(self), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(self)), device=self.device)
            yield self.batch(idx, augment=False)


def subset(images: torch.Tensor, labels: torch.Tensor, n: int, *, balanced: bool,
           num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples, or (balanced) the first n / num_classes of every class.

    Both keep the original record order, so a subset is deterministic and nested in n.
    """
    if not 0 < n <= labels.shape[0]:
        raise ValueError(f"subset size must be in [1, {labels.shape[0]}], got {n}")
    if not balanced:
        return images[:n], labels[:n]
    if n % num_classes:
        raise ValueError(f"a balanced subset needs n divisible by {num_classes}, got {n}")
    return balanced_subset(images, labels, n, num_classes=num_classes)


def synthetic_cifar(n: int, *, seed: int, num_classes: int = 10, noise: float = 40.0,
                    image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable CIFAR-shaped data set: uint8 (n, 3, S, S) images, int64 (n,) labels.

    Class c has a smooth colour template (a random 3 x 4 x 4 pattern upsampled bilinearly);
    an image is its class template scaled by a random contrast in [0.5, 1.5] plus i.i.d.
    N(0, noise^2) pixel noise, around grey 128, clipped to 0-255. Labels are balanced
    (n // num_classes or one more each) and shuffled. Same seed -> same data.
    """
    if n < 1 or num_classes < 2:
        raise ValueError("synthetic_cifar needs n >= 1 and num_classes >= 2")
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g) * 60.0
    templates = torch.nn.functional.interpolate(coarse, size=(image_size, image_size),
                                                mode="bilinear", align_corners=False)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=g)
    pixels = 128.0 + contrast * templates[labels] + noise * torch.randn(n, 3, image_size, image_size,
                                                                        generator=g)
    return pixels.round().clamp(0, 255).to(torch.uint8), labels.to(torch.int64)


# ---------------------------------------------------------------------------- packed subsets
PACK_MANIFEST = "manifest.json"
PACK_FORMAT = "localsgd-cifar-pack-1"
_PACK_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def is_pack(folder) -> bool:
    """Whether `folder` holds a packed subset (a manifest written by `write_pack`)."""
    return (Path(folder) / PACK_MANIFEST).is_file()


def pack_train_size(folder) -> int:
    """The number of training images a pack's manifest announces (nothing else is read)."""
    try:
        return int(json.loads((Path(folder) / PACK_MANIFEST).read_text())["files"]["train_labels"]["shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CorruptFileError(f"{Path(folder) / PACK_MANIFEST}: not a readable pack manifest ({exc})") from exc


def write_pack(folder, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
               *, source: str = "") -> dict:
    """Write uint8 (N, 3, H, W) images and labels of a train and a test split as .npy files
    plus a manifest with their shapes and SHA-256 digests (written last, atomically, so a
    half-written pack has no manifest). Returns the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(_PACK_ARRAYS, (*train, *test)))
    files = {}
    for name, t in arrays.items():
        a = t.detach().cpu().numpy().astype(np.uint8 if "images" in name else np.int64)
        path = folder / f"{name}.npy"
        tmp = path.with_suffix(".npy.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, a, allow_pickle=False)
        os.replace(tmp, path)
        files[name] = {"file": path.name, "shape": list(a.shape), "dtype": str(a.dtype),
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {"format": PACK_FORMAT, "source": source, "files": files,
                "class_counts": {s: torch.bincount(arrays[f"{s}_labels"].cpu().long()).tolist()
                                 for s in ("train", "test")}}
    tmp = folder / (PACK_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / PACK_MANIFEST)
    return manifest


def read_pack(folder) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)) of a pack, every file checked against
    the manifest's SHA-256, shape and dtype first; a missing or altered file raises
    `experiments.data.CorruptFileError` naming it."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / PACK_MANIFEST).read_text())
        if manifest.get("format") != PACK_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {PACK_FORMAT!r}")
        entries = [manifest["files"][name] for name in _PACK_ARRAYS]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{folder / PACK_MANIFEST}: not a readable pack manifest ({exc})") from exc
    out = []
    for name, entry in zip(_PACK_ARRAYS, entries):
        path = folder / entry["file"]
        if not path.is_file():
            raise CorruptFileError(f"{path}: missing from the pack")
        payload = path.read_bytes()
        if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
            raise CorruptFileError(f"{path}: SHA-256 differs from the pack manifest (corrupt or altered)")
        a = np.load(io.BytesIO(payload), allow_pickle=False)
        if list(a.shape) != entry["shape"] or str(a.dtype) != entry["dtype"]:
            raise CorruptFileError(f"{path}: holds {a.dtype} {a.shape}, the manifest says "
                                   f"{entry['dtype']} {entry['shape']}")
        out.append(torch.from_numpy(a.copy()))
    tr_x, tr_y, te_x, te_y = out
    for x, y, split in ((tr_x, tr_y, "train"), (te_x, te_y, "test")):
        if x.dim() != 4 or y.shape != x.shape[:1]:
            raise CorruptFileError(f"{folder}: the {split} split has images {tuple(x.shape)} and "
                                   f"labels {tuple(y.shape)}")
    return (tr_x, tr_y), (te_x, te_y)
