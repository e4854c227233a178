"""Re-scoring a paper cell's saved supports from the files alone (tests/test_paper.py, for a cell DVC
just ran; tests/test_published_supports.py, for every committed cell)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def assert_cell_rescored_exactly(cell: dict, folder: Path, cache_dir: Path) -> None:
    """Each support a cell stage saved, scored by the library directly (KRR under the cell's kernel on
    the test split rebuilt from the support's metadata), gives the cell's published number exactly:
    the same computation on the same data (equal, not close)."""
    from pipeline import artifacts, evaluate, kernels
    from pipeline.config import KernelConfig
    from pipeline.prepared import reprepare

    supports = {name: artifacts.load_npz(folder / file) for name, file in cell["supports"].items()}
    assert all(s.metadata["kernel"] == cell["kernel"] for s in supports.values())
    prepared = reprepare(next(iter(supports.values())), cache_dir=cache_dir)
    kernel_fn = kernels.make(KernelConfig(**cell["kernel"]))  # one kernel: conv_rf's test features computed once
    scored = {name: evaluate.krr_scores(kernel_fn, s.images, s.labels, prepared.x_test, prepared.y_test,
                                        prepared.num_classes, cell["config"]["reg"])["accuracy"]
              for name, s in supports.items()}
    methods = cell["methods"]
    assert scored["kip"] == methods["kip"]["krr"]["mean"], json.dumps(scored)
    assert scored["kip_labels"] == methods["kip_labels"]["krr"]["mean"], json.dumps(scored)
    solves = [scored[f"label_solve_{repeat}"] for repeat in range(methods["label_solve"]["krr"]["n"])]
    assert np.mean(solves) == methods["label_solve"]["krr"]["mean"], json.dumps(scored)
