"""DVC stage `distill`: KIP on the prepared data; writes the distilled set (.npz + .parquet), its
metrics, learning curves and pictures. Resumes from CHECKPOINT when a run was interrupted.

Reads params: seed, kernel.*, distill.* (and tracking.*)   Reads: the prepared .npz.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from _stage import csv_text, run_stage, tracked

from pipeline.artifacts import atomic, npz as artifacts, parquet
from pipeline.data import prepared as prep_io
from pipeline.evaluate import plots
from pipeline.run import distributed, workflow
from pipeline.run.config import DistillConfig, KernelConfig
from pipeline.run.params import read_pipeline_params, section, seed
from pipeline.run.tracking import dataset_tags, file_md5


def main(args: argparse.Namespace) -> None:
    params = read_pipeline_params(args.params)
    kernel = section(params, "kernel", KernelConfig)
    config = section(params, "distill", DistillConfig, seed=seed(params))
    workflow.check_distill_settings(kernel, config)  # before reading any data
    prepared = prep_io.load(args.prepared)
    if not distributed.is_main():  # one of several processes (pipeline/run/distributed.py): process 0 writes and tracks
        workflow.distill(prepared, kernel, config, checkpoint=args.checkpoint, progress=False)
        return
    dataset = prepared.provenance["dataset"]
    with tracked("distill", params, args.params) as tracker:
        tracker.log_params({
            "seed": config.seed, "kernel": asdict(kernel),
            "distill": {k: v for k, v in asdict(config).items() if k != "seed"},
        })
        tracker.set_tags({**dataset_tags(dataset), "kip.seed": config.seed})
        tracker.log_input(f"{dataset['source']}:{dataset['name']}", dataset, dataset["fingerprint"], "training")

        run = workflow.distill(prepared, kernel, config, checkpoint=args.checkpoint)
        distilled = run.distilled
        artifacts.save_npz(args.npz, distilled)
        parquet.save_parquet(args.parquet, distilled, prepared.class_names)
        monitored = [h for h in run.history if "val_accuracy" in h]
        metrics = {
            "support_size": len(distilled.images),
            "steps": distilled.metadata["steps"],
            "final_loss": distilled.metadata["final_loss"],
            "final_val_accuracy": monitored[-1]["val_accuracy"] if monitored else None,
            "privacy_nn_distance_min": distilled.metadata["privacy"]["support"]["min"],
            "privacy_nn_distance_median": distilled.metadata["privacy"]["support"]["median"],
            "real_nn_distance_median": distilled.metadata["privacy"]["real_heldout_images"]["median"],
        }
        if "best_step" in distilled.metadata:  # conv_rf keeps the step that did best on validation
            metrics["kept_step"] = distilled.metadata["best_step"]
            metrics["kept_val_accuracy"] = next(h["val_accuracy"] for h in monitored
                                                if h["step"] == distilled.metadata["best_step"])
        learned = distilled.metadata["privacy"].get("learned_pixels")
        if learned:  # corrupted supports: the distance over the pixels KIP could change
            metrics["privacy_learned_nn_distance_median"] = learned["support"]["median"]
            metrics["real_learned_nn_distance_median"] = learned["real_heldout_images"]["median"]
        atomic.write_json(args.metrics, metrics, sort_keys=False)
        atomic.write_text(args.loss_curve, csv_text([h for h in run.history if "loss" in h], ["step", "loss"]))
        atomic.write_text(args.accuracy_curve, csv_text(monitored, ["step", "val_accuracy"]))
        support_png = plots.support_figure(
            run.initial_images, distilled.images, distilled.classes, prepared.class_names, distilled.transform
        )
        plots.save_png(args.images, support_png)
        plots.save_png(args.curves, plots.learning_curves_figure(run.history))

        tracker.log_history(run.history)
        tracker.log_metrics(metrics)
        tracker.set_tags({"kip.params_hash": distilled.metadata["params_hash"]})
        tracker.tag_files(read=[args.prepared], wrote=[args.npz, args.parquet])
        tracker.log_input("distilled", args.parquet, file_md5(args.parquet), "distilled")
        for path in (args.parquet, args.npz):
            tracker.log_artifact(path, "distilled")
        for path in (args.images, args.curves):
            tracker.log_artifact(path, "images")
    print(f"distill: {len(distilled.images)} images -> {args.npz}, {args.parquet}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--npz", type=Path, required=True)
    parser.add_argument("--parquet", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--loss-curve", type=Path, required=True)
    parser.add_argument("--accuracy-curve", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="PNG: initial vs distilled support, by class")
    parser.add_argument("--curves", type=Path, required=True, help="PNG: loss and monitored accuracy")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    run_stage("distill", main, parser, several_processes=True)
