"""Choose the paper matrix's KIP settings on the validation split (issue 13): never on the test split.

For each support size of the matrix (1, 10, 50 images per class) and each label mode (fixed, learned),
run KIP on MNIST with the FC NTK for each candidate learning rate, score the support on the
validation split every `--every` steps, and keep the (learning rate, steps) with the best validation
accuracy (ties: the fewer steps, then the smaller rate). The test split is never loaded into a score:
this script reads only `prepared.x_val` / `prepared.y_val`.

The winners become the `sizes` block of experiments/paper/params.yaml, for every kernel and both
datasets (one selection on MNIST FC NTK, applied across the matrix, so the selection's cost is paid
once). A constant-rate Adam run with a fixed seed is the same run whatever its length, so the matrix
cell that uses a winner reproduces the winner's support exactly, saves it, and reports its `krr_val`
beside the test number: the validation numbers here are checkable against the matrix's saved supports.

    python benchmarks/select_kip_settings.py --out benchmarks/results/select_kip_settings.json

`--loss cross_entropy` tries the Platt cross-entropy instead of the squared error (the matrix takes,
per size and label mode, the best validation point over both losses' files). The corrupted-support
cell's settings (KIP from noise, 90 % of every image's pixels noise and never learned) come from the
same selection with `--init noise --corruption 0.9`, each with its own `--out`.

Data come from the `registry` source, cached in $KIP_CACHE_DIR. About 30 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from _report import emit

from pipeline.data.prepared import Prepared, prepare
from pipeline.errors import UserError
from pipeline.run import workflow
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, DistillConfig, KernelConfig, PreprocessConfig

LEARNING_RATES = (0.01, 0.04)
# Step budgets per (images per class, learn labels): the longest run tried; every `--every` steps of it
# is a candidate. Learned labels at 10 per class are known to keep improving for ~10k steps; 50 per
# class cost ~280 CPU ms a step, so 1000 steps is what the matrix can afford in its 90-minute budget.
BUDGETS = {(1, False): 4000, (1, True): 4000, (10, False): 4000, (10, True): 10000, (50, False): 1000, (50, True): 1000}


def select(curve: list[dict[str, float]]) -> dict[str, float]:
    """The best validation point of one run (ties: fewer steps)."""
    return max(curve, key=lambda point: (point["val_accuracy"], -point["step"]))


def select_settings(prepared: Prepared, kernel: KernelConfig, spcs: Sequence[int], every: int,
                    budgets: Mapping[tuple[int, bool], int] = BUDGETS,
                    learning_rates: Sequence[float] = LEARNING_RATES,
                    label_modes: Sequence[bool] = (False, True),
                    base: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """{"spc<n>_fixed|labels": {learning_rate, steps, val_accuracy}} and every run's validation curve.

    `base` holds DistillConfig fields every run shares (e.g. init: noise, corruption: 0.9 for the
    matrix's corrupted-support cell).

    Reads the validation split only (through workflow.distill's monitor); tests/test_validation.py
    checks that a test split of NaN changes nothing here.
    """
    runs, chosen = [], {}
    for spc in spcs:
        for learn in label_modes:
            best = None
            for lr in learning_rates:
                config = DistillConfig(**(base or {}), support_per_class=spc, steps=budgets[spc, learn],
                                       learning_rate=lr, learn_labels=learn, eval_every=every, checkpoint_every=0)
                t0 = time.process_time()
                history = workflow.distill(prepared, kernel, config, progress=False).history
                curve = [{"step": h["step"], "val_accuracy": h["val_accuracy"]} for h in history if "val_accuracy" in h]
                point = select(curve)
                run = {"support_per_class": spc, "learn_labels": learn, "learning_rate": lr, "steps": config.steps,
                       "cpu_seconds": round(time.process_time() - t0, 1), "best": point, "curve": curve}
                runs.append(run)
                print(json.dumps({k: v for k, v in run.items() if k != "curve"}), file=sys.stderr, flush=True)
                if best is None or (point["val_accuracy"], -point["step"]) > (best["val_accuracy"], -best["steps"]):
                    best = {"learning_rate": lr, "steps": int(point["step"]), "val_accuracy": point["val_accuracy"]}
            chosen[f"spc{spc}_{'labels' if learn else 'fixed'}"] = best
    return chosen, runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--spc", type=int, nargs="+", default=[1, 10, 50], choices=[1, 10, 50])
    parser.add_argument("--every", type=int, default=250, help="validation scoring interval (steps)")
    parser.add_argument("--budget", action="append", default=[], metavar="SPC:MODE=STEPS",
                        help="override a step budget, e.g. 50:labels=4000 (MODE fixed or labels); for "
                             "checking whether a budget-bound choice keeps improving")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--label-modes", nargs="+", default=["fixed", "labels"], choices=["fixed", "labels"])
    parser.add_argument("--init", default="real", choices=["real", "noise"], help="KIP's initial support")
    parser.add_argument("--corruption", type=float, default=0.0,
                        help="fraction of every support image's pixels that are noise and never learned, in [0, 1)")
    parser.add_argument("--loss", default="mse", choices=["mse", "cross_entropy"],
                        help="KIP's loss on the targets (a constant learning rate keeps every checkpoint a candidate)")
    args = parser.parse_args()
    base = {"init": args.init, "corruption": args.corruption, "loss": args.loss}
    try:
        DistillConfig(**base)  # refuses a bad value in one line before any data is loaded
    except UserError as error:
        parser.error(str(error))
    budgets = dict(BUDGETS)
    for entry in args.budget:
        try:
            size, rest = entry.split(":")
            mode, steps = rest.split("=")
            if mode not in ("fixed", "labels"):
                raise ValueError
            budgets[int(size), mode == "labels"] = int(steps)
        except ValueError:
            parser.error(f"--budget {entry!r}: expected SPC:MODE=STEPS with MODE fixed or labels, e.g. 50:labels=4000")

    data = DataConfig(source="registry", name="mnist")  # validation_fraction 0.1, seed 0: as the matrix
    kernel = KernelConfig(architecture="fc", kind="ntk", depth=1)
    prepared = prepare(data, PreprocessConfig(method="standardize"), cache_dir=default_cache_dir())
    started = time.perf_counter()
    chosen, runs = select_settings(prepared, kernel, args.spc, args.every, budgets, args.learning_rates,
                                   [mode == "labels" for mode in args.label_modes], base)
    emit({
        "benchmark": "select_kip_settings",
        "rule": "max validation accuracy over learning rates and every-`every`-steps checkpoints; ties: fewer steps",
        "data": asdict(data), "kernel": asdict(kernel), "validation": prepared.provenance.get("validation"),
        "learning_rates": args.learning_rates, "every": args.every, "shared_settings": base,
        "budgets": {f"spc{size}_{'labels' if learn else 'fixed'}": steps for (size, learn), steps in budgets.items()},
        "chosen": chosen, "runs": runs, "total_seconds": round(time.perf_counter() - started, 1),
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
