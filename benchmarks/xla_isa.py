"""Does capping XLA's instruction set change a distilled set's bytes on this machine?

The same `kip distill` (MNIST, 1000 steps, the default FC kernel) under XLA's default code generation
and under `XLA_FLAGS=--xla_cpu_max_isa=...`, each in a fresh process; prints each run's sha256 and
wall time. Equal digests for two caps mean that on this CPU they compile to the same arithmetic.
Which caps make two *different* CPU models agree takes running this on both (docs/testing.md,
Determinism).

    python benchmarks/xla_isa.py [--caps default AVX2 AVX] [--out benchmarks/results/xla_isa.json]
"""
from __future__ import annotations

import _report  # noqa: F401  (first: the run's start, for other_load)

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", nargs="+", default=["default", "AVX2", "AVX"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for cap in args.caps:
            out = Path(scratch) / f"{cap}.npz"
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            if cap != "default":
                env["XLA_FLAGS"] = f"--xla_cpu_max_isa={cap}"
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "pipeline.run.cli", "distill", "--steps", str(args.steps), "-q",
                            "-o", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
            runs.append({"cap": cap, "seconds": round(time.monotonic() - started, 1),
                         "sha256": hashlib.sha256(out.read_bytes()).hexdigest()})
    emit({"command": f"kip distill --steps {args.steps} -q", "runs": runs}, args.out)


if __name__ == "__main__":
    main()
