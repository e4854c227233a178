"""DVC stage `prepare`: load the dataset, fit the preprocessing on train, write data/prepared.npz.

Reads params: seed (the validation split), data.*, preprocess.* (and tracking.*)   Writes: the prepared .npz given as OUT.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from _stage import run_stage, tracked

from pipeline.data import prepared as prep_io
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, PreprocessConfig
from pipeline.run.params import read_pipeline_params, section, seed
from pipeline.run.tracking import dataset_tags


def main(args: argparse.Namespace) -> None:
    params = read_pipeline_params(args.params)
    data = section(params, "data", DataConfig, seed=seed(params))
    prep = section(params, "preprocess", PreprocessConfig)
    with tracked("prepare", params, args.params) as tracker:
        tracker.log_params({"data": asdict(data), "preprocess": asdict(prep)})
        prepared = prep_io.prepare(data, prep, cache_dir=default_cache_dir())
        prep_io.save(args.out, prepared)
        dataset = prepared.provenance["dataset"]
        tracker.set_tags(dataset_tags(dataset))
        tracker.log_input(f"{dataset['source']}:{dataset['name']}", dataset, dataset["fingerprint"], "source")
        tracker.log_metrics({"train_size": len(prepared.y_train), "validation_size": len(prepared.y_val),
                             "test_size": dataset["test_size"]})
        decoded = dataset.get("decode")  # imagefolder / parquet: what decoding read, skipped and resized
        if decoded:
            tracker.log_metrics({f"images_{key}": decoded[key] for key in ("read", "skipped", "resized", "converted", "ignored")})
        tracker.tag_files(wrote=[args.out])
    if decoded:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in decoded["skipped_by_reason"].items())
        print(f"prepare: images read {decoded['read']}, skipped {decoded['skipped']}" + (f" ({reasons})" if reasons else "")
              + f", resized {decoded['resized']} to {decoded['image_size']}x{decoded['image_size']}, converted "
              f"{decoded['converted']} to {decoded['channels']} channel(s), ignored {decoded['ignored']} (not images)")
    print(f"prepare: {dataset['name']} ({len(prepared.y_train)} train / {len(prepared.y_val)} validation / "
          f"{dataset['test_size']} test) -> {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    run_stage("prepare", main, parser)
