"""DVC stage `train`: finite networks (Flax) trained on the distilled set and, on the same budget, on
random real subsets of the same size; all scored once on the full test split over several seeds,
with learning curves on the validation split.

Reads params: seed, train.* (and tracking.*)   Reads: the distilled .npz and the prepared .npz.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from _stage import csv_text, run_stage, tracked

from pipeline.artifacts import atomic, npz as artifacts
from pipeline.data import prepared as prep_io
from pipeline.evaluate import plots, transfer
from pipeline.run.config import TrainConfig
from pipeline.run.params import read_pipeline_params, section, seed
from pipeline.run.tracking import dataset_tags, file_md5

CURVE_COLUMNS = ("step", "distilled_val_accuracy", "baseline_val_accuracy")


def main(args: argparse.Namespace) -> None:
    params = read_pipeline_params(args.params)
    config = section(params, "train", TrainConfig, seed=seed(params))
    distilled = artifacts.load_npz(args.distilled)
    prepared = prep_io.load(args.prepared)
    with tracked("train", params, args.params) as tracker:
        tracker.log_params({"seed": config.seed, "train": {k: v for k, v in asdict(config).items() if k != "seed"}})
        tracker.set_tags(dataset_tags(prepared.provenance["dataset"]))
        tracker.log_input("distilled", args.distilled, file_md5(args.distilled), "training")
        metrics, curve = transfer.transfer(distilled, prepared, config)
        atomic.write_json(args.metrics, metrics)
        atomic.write_text(args.curve, csv_text(curve, CURVE_COLUMNS))
        plots.save_png(args.curve_png, plots.transfer_figure(curve))
        tracker.log_history(curve)
        tracker.log_metrics(metrics)
        tracker.log_summary({k: v for k, v in metrics.items() if k.startswith("nn_")})
        tracker.log_artifact(args.curve_png, "images")
        tracker.tag_files(read=[args.distilled, args.prepared], wrote=[args.metrics])
    print(
        f"train: network test accuracy {metrics['nn_test_accuracy']:.4f} ± {metrics['nn_test_accuracy_std']:.4f} "
        f"on {metrics['support_size']} distilled images (random real images: "
        f"{metrics['nn_baseline_test_accuracy']:.4f} ± {metrics['nn_baseline_test_accuracy_std']:.4f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("distilled", type=Path)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--curve", type=Path, required=True, help="CSV: validation accuracy per eval step")
    parser.add_argument("--curve-png", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    run_stage("train", main, parser)
