"""DVC stage `evaluate`: KRR test accuracy of the distilled set beside random real subsets.

Reads params: seed, evaluate.* (and tracking.*)   Reads: the distilled .npz and the prepared .npz.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from _stage import run_stage, tracked

from pipeline.artifacts import atomic, npz as artifacts
from pipeline.data import prepared as prep_io
from pipeline.run import workflow
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, EvaluateConfig, PreprocessConfig, from_mapping
from pipeline.run.params import read_pipeline_params, section, seed
from pipeline.run.tracking import dataset_tags, file_md5


def main(args: argparse.Namespace) -> None:
    params = read_pipeline_params(args.params)
    config = section(params, "evaluate", EvaluateConfig, seed=seed(params))
    distilled = artifacts.load_npz(args.distilled)
    prepared = prep_io.load(args.prepared)
    with tracked("evaluate", params, args.params) as tracker:
        tracker.log_params({"seed": config.seed, "evaluate": {k: v for k, v in asdict(config).items() if k != "seed"}})
        dataset = prepared.provenance["dataset"]
        tracker.set_tags({**dataset_tags(dataset), "kip.seed": config.seed})
        tracker.log_input("distilled", args.distilled, file_md5(args.distilled), "evaluation")
        tracker.log_input(f"{dataset['source']}:{dataset['name']}", dataset, dataset["fingerprint"], "test")
        # The strongest simple baseline: random real images under the default preprocessing too.
        default = None
        if prepared.transform.method != PreprocessConfig().method:
            data = from_mapping(DataConfig, prepared.provenance["data"], "data")
            default = prep_io.prepare(data, PreprocessConfig(), cache_dir=default_cache_dir())
        metrics = workflow.evaluate(distilled, prepared, config, default)
        atomic.write_json(args.metrics, metrics)
        tracker.log_metrics(metrics)
        tracker.set_tags({f"kip.{k}": v for k, v in metrics.items() if isinstance(v, str)})
        tracker.log_summary(metrics)
        tracker.tag_files(read=[args.distilled, args.prepared], wrote=[args.metrics])
    print(
        f"evaluate: KRR test accuracy {metrics['krr_test_accuracy']:.4f} with {metrics['support_size']} images "
        f"(random real images: {metrics['baseline_test_accuracy']:.4f}, {metrics['baseline_preprocessing']}; "
        f"Label Solve: {metrics['label_solve_test_accuracy']:.4f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("distilled", type=Path)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    run_stage("evaluate", main, parser)
