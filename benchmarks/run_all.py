"""Run every benchmark (each compares the toolkit with its peer side by side) and assemble BENCHMARKS.md.

    python -m benchmarks.run_all [NAME ...]      # e.g. bench_hessian bench_sde_em
"""
from __future__ import annotations

import runpy
import sys

from benchmarks.collect import BENCHMARKS, collect


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    for name in names:
        print(f"== {name}", flush=True)
        runpy.run_module(f"benchmarks.{name}", run_name="__main__")
    collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
