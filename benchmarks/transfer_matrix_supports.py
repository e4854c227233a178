"""How should networks be trained on the matrix's learned-label supports? (issue 13, exploratory)

The re-run paper matrix's networks (library defaults: centred MSE, SGD 0.5, 500 steps, label scale of
0.1 / 1 / 10 chosen on validation) lose to random real images on some learned-label supports. This
trains one width-1024 network (init seed 999) per setting on the FC NTK 100-image learned-label
supports of MNIST and Fashion-MNIST from `experiments/paper/results/supports/` (those supports went to a
DVC remote that is gone: re-run their cells first, docs/reproduction.md "Supports live in git") and scores it on the
validation split only: it chooses nothing and reports no test number.

    python benchmarks/transfer_matrix_supports.py > benchmarks/results/transfer_matrix_supports.jsonl
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from pipeline.artifacts import npz as artifacts
from pipeline.data.prepared import prepare
from pipeline.errors import UserError
from pipeline.evaluate import finite
from pipeline.data.datasets import default_cache_dir
from pipeline.run.config import DataConfig, PreprocessConfig, TrainConfig

SUPPORTS = Path(__file__).resolve().parents[1] / "experiments" / "paper" / "results" / "supports"
SETTINGS = [("sgd", 0.5, 500), ("sgd", 0.1, 1000), ("sgd", 0.5, 2000), ("adam", 1e-3, 1000)]
SCALES = (0.1, 1.0, 10.0)


def main() -> int:
    for dataset in ("mnist", "fashion_mnist"):
        prepared = prepare(DataConfig("registry", dataset), PreprocessConfig("standardize"), cache_dir=default_cache_dir())
        support = artifacts.load_npz(SUPPORTS / f"{dataset}-fc_ntk-10" / "kip_labels.npz")
        base = TrainConfig(width=1024, seeds=1, eval_every=0, label_scale_choice="fixed")
        for optimizer, learning_rate, steps in SETTINGS:
            for scale in SCALES:
                config = dataclasses.replace(base, optimizer=optimizer, learning_rate=learning_rate, steps=steps,
                                             label_scale=scale)
                started = time.process_time()
                try:
                    accuracy = finite.train(support.images, support.labels, support.classes, prepared.x_val,
                                            prepared.y_val, prepared.num_classes, config, 999).accuracy
                except UserError:  # diverged
                    accuracy = None
                print(json.dumps({"dataset": dataset, "support": f"{dataset}-fc_ntk-10/kip_labels.npz",
                                  "optimizer": optimizer, "learning_rate": learning_rate, "steps": steps,
                                  "label_scale": scale, "val_accuracy": accuracy,
                                  "cpu_seconds": round(time.process_time() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
