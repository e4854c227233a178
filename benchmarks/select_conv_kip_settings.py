"""Choose the ConvNet-kernel cells' KIP loss and learning-rate schedule on the validation split (issue 14).

The 100-image ConvNet runs of benchmarks/conv_kip.py did better on validation with the Platt-scaled
cross-entropy and a cosine learning rate than with KIP's squared error at a constant rate, but
only with learned labels and over other step budgets. This script puts the candidates through the
matrix cell's own runs: for a cell of experiments/paper/params.yaml (default the Fashion-MNIST
100-image ConvNet cell), each candidate (loss, lr_schedule) replaces the cell's own on both KIP
rows (fixed labels, learned labels), everything else as the cell has it (steps, rate, targets,
seed, data, `workflow.distill`), so the cell that adopts a winner re-runs the winner exactly.

The loop keeps the step that scores best on the first 2,000 validation images
(conv_features.PIPELINE_VAL_IMAGES). Candidates are then compared on the validation images the loop
never saw (the rest of the split, 4,000 images), under the cell's evaluation kernel: the step
choice cannot flatter the candidate it was made for. Rule, per label mode: the highest held-out
accuracy; ties go to the earlier candidate (the cell's current settings first). The test split is
never scored (tests/test_validation.py poisons it).

    python benchmarks/select_conv_kip_settings.py --out benchmarks/results/select_conv_kip_settings.json

Data come from the `registry` source, cached in $KIP_CACHE_DIR. Four 1000-step runs of 100 images:
16.5 minutes each on 2 quiet cores (86 minutes in all for the committed JSON, beside other work at first).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from _report import OtherLoad, emit

from pipeline.data.prepared import Prepared
from pipeline.errors import UserError
from pipeline.evaluate import scoring as evaluate
from pipeline.kernels import functions as kernels
from pipeline.kernels.conv_features import PIPELINE_VAL_IMAGES
from pipeline.run import workflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "paper"))
import paper  # noqa: E402  (experiments/paper's cell configs; not part of the library)

CANDIDATES = (("mse", "constant"), ("cross_entropy", "cosine"))
ROOT = Path(__file__).resolve().parents[1]


def select_settings(prepared: Prepared, cell: paper.CellConfig,
                    candidates: Sequence[tuple[str, str]] = CANDIDATES,
                    monitored: int = PIPELINE_VAL_IMAGES, progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """{"fixed"|"labels": {loss, lr_schedule, steps, heldout_accuracy}} and every run's record.

    Reads the validation split only: the loop's monitor reads its first `monitored` images, the
    comparison the rest."""
    x_held, y_held = prepared.x_val[monitored:], prepared.y_val[monitored:]
    if not len(y_held):
        raise SystemExit(f"select_conv_kip_settings: the validation split has {len(prepared.y_val)} images, all "
                         f"monitored by the loop; expected more than {monitored}")
    kernel_fn = kernels.make(cell.kernel)
    runs, chosen = [], {}
    for name, mode in (("kip", "fixed"), ("kip_labels", "labels")):
        best = None
        for loss, schedule in candidates:
            config = dataclasses.replace(getattr(cell, name), loss=loss, lr_schedule=schedule)
            started = time.process_time(), time.perf_counter()
            with OtherLoad() as load:
                run = workflow.distill(prepared, cell.kernel, config, progress=progress)
            distilled = run.distilled
            held = evaluate.krr_scores(kernel_fn, distilled.images, distilled.labels, x_held, y_held,
                                       prepared.num_classes, cell.reg)["accuracy"]
            record = {
                "labels": mode, "loss": loss, "lr_schedule": schedule, "steps": config.steps,
                "learning_rate": config.learning_rate, "best_step": distilled.metadata["best_step"],
                "heldout_accuracy": held, "heldout_images": int(len(y_held)),
                "cpu_minutes": round((time.process_time() - started[0]) / 60, 1),
                "wall_minutes": round((time.perf_counter() - started[1]) / 60, 1), "other_load_cores": load.cores,
                "curve": [{"step": p["step"], "val_accuracy": p["val_accuracy"]} for p in run.history if "val_accuracy" in p],
            }
            runs.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "curve"}), file=sys.stderr, flush=True)
            if best is None or held > best["heldout_accuracy"]:
                best = {"loss": loss, "lr_schedule": schedule, "steps": config.steps, "heldout_accuracy": held}
        chosen[mode] = best
    return chosen, runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="fashion_mnist-conv_rf-10", help="a key of experiments/paper/params.yaml's cells")
    parser.add_argument("--params", type=Path, default=ROOT / "experiments" / "paper" / "params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    from _paper import load_cell, prepare_dataset  # the cell and its data exactly as `dvc repro cell@<key>` has them

    try:
        cell = load_cell(args.params, args.cell)
    except UserError as error:
        parser.error(str(error))
    if cell.kernel.architecture != "conv_rf":
        parser.error(f"--cell {args.cell!r} has kernel.architecture={cell.kernel.architecture}; expected a conv_rf cell")
    prepared = prepare_dataset(cell.dataset, cell.seed)
    started = time.perf_counter()
    chosen, runs = select_settings(prepared, cell, progress=True)
    emit({
        "benchmark": "select_conv_kip_settings",
        "cell": args.cell,
        "rule": "per label mode, the highest KRR accuracy on the validation images the loop did not monitor "
                "(its best step's support, the cell's evaluation kernel); ties: the earlier candidate",
        "candidates": [{"loss": loss, "lr_schedule": schedule} for loss, schedule in CANDIDATES],
        "kernel": dataclasses.asdict(cell.kernel),
        "config": {"kip": dataclasses.asdict(cell.kip), "kip_labels": dataclasses.asdict(cell.kip_labels),
                   "reg": cell.reg},
        "validation": prepared.provenance.get("validation"), "monitored_images": PIPELINE_VAL_IMAGES,
        "chosen": chosen, "runs": runs, "total_minutes": round((time.perf_counter() - started) / 60, 1),
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
