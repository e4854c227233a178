"""DVC stage `distill`: KIP on the prepared data; writes the distilled set (.npz + .parquet),
its metrics and learning curves. Resumes from CHECKPOINT when a run was interrupted.

Reads params: seed, kernel.*, distill.*   Reads: the prepared .npz.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from _stage import run_stage

from pipeline import artifacts, atomic, parquet, workflow
from pipeline import prepared as prep_io
from pipeline.config import DistillConfig, KernelConfig
from pipeline.params import read_params, section, seed


def main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    kernel = section(params, "kernel", KernelConfig)
    config = section(params, "distill", DistillConfig, seed=seed(params))
    prepared = prep_io.load(args.prepared)
    distilled, history = workflow.distill(prepared, kernel, config, checkpoint=args.checkpoint)

    artifacts.save_npz(args.npz, distilled)
    parquet.save_parquet(args.parquet, distilled, prepared.class_names, npz_name=args.npz.name)
    monitored = [h for h in history if "monitor_accuracy" in h]
    metrics = {
        "support_size": len(distilled.images),
        "steps": distilled.metadata["steps"],
        "final_loss": distilled.metadata["final_loss"],
        "final_monitor_accuracy": monitored[-1]["monitor_accuracy"] if monitored else None,
    }
    atomic.write_text(args.metrics, json.dumps(metrics, indent=2) + "\n")
    atomic.write_text(args.loss_curve, _csv(history, ["step", "loss"]))
    atomic.write_text(args.accuracy_curve, _csv(monitored, ["step", "monitor_accuracy"]))
    print(f"distill: {len(distilled.images)} images -> {args.npz}, {args.parquet}")


def _csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prepared", type=Path)
    parser.add_argument("--npz", type=Path, required=True)
    parser.add_argument("--parquet", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--loss-curve", type=Path, required=True)
    parser.add_argument("--accuracy-curve", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    run_stage("distill", main, parser)
