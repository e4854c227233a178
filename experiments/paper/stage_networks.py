"""DVC stage `networks@<key>` of experiments/paper: finite networks trained on one cell's saved KIP
supports (both label modes), settings chosen on the validation split per support.

Reads params: shared.seed, cells.<key>.*, train.<the cell's train name>   Reads: the cell's supports (.npz), the
registry download cache.   Writes: one JSON of network results, merged into the cell by the report.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import paper
import paper_networks
from _paper import load_cell, prepare_dataset
from _stage import run_stage

from pipeline.artifacts import atomic, npz as artifacts


def main(args: argparse.Namespace) -> None:
    cell = load_cell(args.params, args.key)
    prepared = prepare_dataset(cell.dataset, cell.seed)
    supports = {name: artifacts.load_npz(args.supports / f"{name}.npz") for name in paper_networks.SUPPORTS}
    result = paper_networks.run_support_networks(prepared, cell.train, supports, progress=args.progress)
    atomic.write_json(args.out, {"key": args.key, **result})
    line = ", ".join(f"{name} {paper.fmt(m['nn'])}" for name, m in result["methods"].items())
    print(f"networks {args.key}: test accuracy (%) {line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("key")
    parser.add_argument("--supports", type=Path, required=True, help="the cell stage's support directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--progress", action="store_true", help="show a progress bar over network training")
    run_stage("networks", main, parser)
