"""Pack a class-balanced real CIFAR-10 subset for a machine without the archive (the GPU check).

    python -m benchmarks.pack_cifar_subset [--train 10000] [--test 2000] [--out data_subset]
                                           [--wheel PATH.whl ...]

Reads the real CIFAR-10 through `experiments.data` (CIFAR10_DIR or --data-dir; the archive's
own checksums are verified there), takes the first n / 10 images of every class in record
order (`experiments.data.balanced_subset`) of the training and the test split, and writes
them as uint8 .npy files with a SHA-256 manifest (`experiments.datasets.write_pack`) into the
git-ignored folder `data_subset/`. The trainer reads such a folder given as --data-dir (its
checksums checked first). 10,000 + 2,000 images are 36.9 MB.

--wheel copies pure-Python wheels (e.g. PyHessian-0.1-py3-none-any.whl, the peer of the
eigenvalue benchmark) into OUT/wheels/, which benchmarks/gpu_check.sh puts on PYTHONPATH, so
the GPU machine installs nothing.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

MAX_BYTES = 40_000_000


def pack(out: Path, *, train: int, test: int, data_dir: str | None = None) -> dict:
    """Write the pack; returns its manifest. ValueError if it would exceed MAX_BYTES."""
    from experiments.data import balanced_subset, load_cifar10, resolve_cifar10_dir
    from experiments.datasets import write_pack
    if (train + test) * 3 * 32 * 32 > MAX_BYTES:
        raise ValueError(f"{train} + {test} images are {(train + test) * 3072 / 1e6:.1f} MB of pixels, "
                         f"more than the {MAX_BYTES / 1e6:.0f} MB a carried pack may take")
    root = resolve_cifar10_dir(data_dir, search=True)
    tr = balanced_subset(*load_cifar10(root, "train"), train)
    te = balanced_subset(*load_cifar10(root, "test"), test)
    return write_pack(out, tr, te, source=f"CIFAR-10 (binary release), class-balanced first "
                                          f"{train} training and {test} test images in record order")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--test", type=int, default=2_000)
    ap.add_argument("--out", default="data_subset")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--wheel", action="append", default=[], help="a pure-Python wheel to carry along")
    args = ap.parse_args(argv)
    for w in args.wheel:
        if not (w.endswith(".whl") and Path(w).is_file()):
            ap.error(f"--wheel {w}: not a .whl file")
    out = Path(args.out)
    manifest = pack(out, train=args.train, test=args.test, data_dir=args.data_dir)
    if args.wheel:
        (out / "wheels").mkdir(exist_ok=True)
        for w in args.wheel:
            shutil.copy2(w, out / "wheels" / Path(w).name)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {args.train} train + {args.test} test images, class counts "
          f"{manifest['class_counts']}, {size / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
