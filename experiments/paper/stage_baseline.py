"""DVC stage `baseline@<key>` of experiments/paper: finite networks trained on class-balanced random
real subsets of one (dataset, images per class, train settings), the networks every kernel's cell of
that size and train settings is compared with (they do not depend on the kernel, so they are trained once).

Reads params: shared.seed, baselines.<key>.*, train.<the baseline's train name>   Reads: the registry download cache.
Writes: one JSON of network results, merged into the cells by the report.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import paper
import paper_networks
from _paper import prepare_dataset
from _stage import run_stage

from pipeline.artifacts import atomic
from pipeline.errors import UserError
from pipeline.run.params import read_params


def main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    baselines = params.get("baselines") or {}
    if args.key not in baselines:
        raise UserError(f"baseline {args.key!r} is not in {args.params}; expected one of: {'|'.join(sorted(baselines))}")
    config = paper_networks.baseline_config(args.key, params.get("shared") or {}, baselines[args.key],
                                            params.get("train") or {})
    prepared = prepare_dataset(config.dataset, config.train.seed)
    result = paper_networks.run_baseline_networks(prepared, config, progress=args.progress)
    atomic.write_json(args.out, result)
    print(f"baseline {args.key}: random real subsets' networks {paper.fmt(result['methods']['random']['nn'])} %")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("key")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--progress", action="store_true", help="show a progress bar over network training")
    run_stage("baseline", main, parser)
