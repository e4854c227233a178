"""DVC stage `report` of experiments/paper: the matrix's cells as results/table.md, results/figure.png
and results/summary.json (with the checks the comparison should pass), logged to MLflow.

Reads params: paper (published numbers), tracking.*   Reads: results/cells/*.json, each merged with
results/networks/<key>.json (its supports' networks) and results/baselines/<dataset>-<spc>-<train>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import _paper  # noqa: F401  (puts stages/ on sys.path for _stage)
import paper_networks
import paper_report
from _stage import run_stage, tracked

from pipeline.artifacts import atomic
from pipeline.errors import UserError
from pipeline.evaluate import plots
from pipeline.run.params import read_params


def main(args: argparse.Namespace) -> None:
    params = read_params(args.params)
    files = sorted(args.cells.glob("*.json"))
    if not files:
        raise UserError(f"{args.cells} holds no cell results; expected the output of the `cell` stages")
    cells = [_with_networks(json.loads(path.read_text()), args) for path in files]
    published = params.get("paper") or []
    verdict = paper_report.checks(cells)
    verdict["networks_not_run"] = sorted(cell["key"] for cell in cells if cell.get("networks_not_run"))
    summary = {**paper_report.summary(cells), "checks": verdict}
    with tracked("paper-report", params, args.params) as tracker:
        atomic.write_text(args.table, paper_report.table_markdown(cells, published, verdict))
        plots.save_png(args.figure, paper_report.figure(cells, published))
        atomic.write_json(args.summary, summary)
        tracker.log_params({"cells": {cell["key"]: cell["config"] for cell in cells}})
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None})
        tracker.log_summary({"kip_beats_baselines": verdict["kip_beats_baselines"], "cells": len(cells)})
        for path in (args.table, args.figure, args.summary):
            tracker.log_artifact(path)
        read = files + [args.networks / path.name for path in files] + sorted(args.baselines.glob("*.json"))
        tracker.tag_files(read=read, wrote=[args.table, args.figure, args.summary])
    state = "passes" if verdict["kip_beats_baselines"] else f"fails in {len(verdict['failures'])} cells"
    print(f"report: {len(cells)} cells -> {args.table}, {args.figure}; KIP-beats-baselines check {state}")


def _with_networks(cell: dict, args: argparse.Namespace) -> dict:
    """The cell with its networks and its (dataset, size, train settings)' random-subset networks merged in."""
    baseline = paper_networks.cell_baseline_key(cell)
    found = {}
    for name, path, stage in (("networks", args.networks / f"{cell['key']}.json", f"networks@{cell['key']}"),
                              ("baseline", args.baselines / f"{baseline}.json", f"baseline@{baseline}")):
        if not path.is_file():
            if args.partial:  # an interim report while network stages are still to run: said in the table
                return {**cell, "networks_not_run": True}
            hint = f" (params.yaml needs baselines.{baseline})" if name == "baseline" else ""
            raise UserError(f"{path} is missing; expected the output of the `{stage}` stage{hint}")
        found[name] = json.loads(path.read_text())
    return paper_networks.merge(cell, found["networks"], found["baseline"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cells", type=Path)
    parser.add_argument("--networks", type=Path, required=True, help="the `networks` stages' results")
    parser.add_argument("--baselines", type=Path, required=True, help="the `baseline` stages' results")
    parser.add_argument("--table", type=Path, required=True)
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--partial", action="store_true",
                        help="an interim report by hand: cells whose network stages have not run yet are marked so "
                             "(never used by dvc.yaml, whose report needs every network result)")
    run_stage("report", main, parser)
