"""DVC stage `prepare`: load the dataset, fit the preprocessing on train, write data/prepared.npz.

Reads params: data.*, preprocess.*   Writes: the prepared .npz given as OUT.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _stage import run_stage

from pipeline import prepared as prep_io
from pipeline.cli import default_cache_dir
from pipeline.config import DataConfig, PreprocessConfig
from pipeline.params import read_params, section


def main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    prepared = prep_io.prepare(
        section(params, "data", DataConfig),
        section(params, "preprocess", PreprocessConfig),
        cache_dir=default_cache_dir(),
    )
    prep_io.save(args.out, prepared)
    dataset = prepared.provenance["dataset"]
    print(f"prepare: {dataset['name']} ({dataset['train_size']} train / {dataset['test_size']} test) -> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    run_stage("prepare", main, parser)
