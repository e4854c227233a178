"""DVC stage `cell@<key>` of experiments/paper: one (dataset, kernel, images per class) of the KIP
paper's comparison (random, Label Solve, KIP, KIP + learned labels; KRR and finite networks).

Reads params: shared.*, cells.<key>.*   Reads: the registry download cache.
Writes: one JSON, the support sets behind its numbers (npz + Parquet, with lineage), and a picture of
the KIP + labels support beside the real images it started from (kip_labels.png).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import paper
from _paper import load_cell, prepare_dataset
from _stage import run_stage

from pipeline.artifacts import atomic, npz as artifacts, parquet
from pipeline.distill import kip
from pipeline.evaluate import plots


def main(args: argparse.Namespace) -> None:
    cell = load_cell(args.params, args.key)
    prepared = prepare_dataset(cell.dataset, cell.seed)
    summary, supports = paper.run_cell(prepared, cell, progress=args.progress, checkpoints=args.checkpoints)
    for name, distilled in supports.items():  # every support set behind a number, re-scorable by `kip evaluate`
        artifacts.save_npz(args.supports / f"{name}.npz", distilled)
        parquet.save_parquet(args.supports / f"{name}.parquet", distilled, prepared.class_names)
    # The KIP + labels support beside the real images it started from (kip.init_support: the same seeded draw).
    initial, _ = kip.init_support(prepared.x_train, prepared.y_train, prepared.num_classes, cell.kip_labels)
    learned = supports["kip_labels"]
    plots.save_png(args.supports / "kip_labels.png", plots.support_figure(
        initial, learned.images, learned.classes, prepared.class_names, learned.transform))
    result = {"key": args.key, **summary, "supports": {name: f"{name}.npz" for name in supports}}
    atomic.write_json(args.out, result)
    line = ", ".join(f"{name} {paper.fmt(m['krr'])}" for name, m in result["methods"].items())
    print(f"cell {args.key}: KRR test accuracy (%) {line}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("key")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--supports", type=Path, required=True, help="directory for the cell's support sets (.npz + .parquet)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--progress", action="store_true", help="show KIP progress bars")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="directory for the KIP runs' checkpoints (kip.npz, kip_labels.npz), resumed by a re-run; "
                             "they are written as the cell's kip.checkpoint_every says")
    run_stage("cell", main, parser)
