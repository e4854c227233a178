"""Re-scoring saved supports from the files alone: a paper cell DVC just ran (tests/test_paper.py),
and every committed support behind a published number (tests/test_published_supports.py, against
the per-image predictions tests/golden/record_predictions.py recorded from a full scoring)."""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper" / "results"
BENCHMARKS = ROOT / "benchmarks" / "results"
GOLDEN = Path(__file__).resolve().parent / "golden" / "predictions"
# The rows a golden test re-scores: one whole block of the scoring paths' blocks (1000 rows in
# evaluate.krr_predictions, 500 in conv_kip.krr_predictions), so they come out byte for byte as in
# the full scoring that recorded the predictions.
BLOCK = 1000


def cell_scores(cell: dict, folder: Path, cache_dir: Path, rows: slice = slice(None)) -> dict[str, tuple]:
    """Each support a cell stage saved, scored by the library directly (KRR under the cell's kernel on
    the test split rebuilt from the support's metadata): name -> (predicted classes, labels) on the
    test images `rows`."""
    from pipeline.artifacts import npz as artifacts
    from pipeline.data.prepared import reprepare
    from pipeline.evaluate import scoring as evaluate
    from pipeline.kernels import functions as kernels
    from pipeline.run.config import KernelConfig

    supports = {name: artifacts.load_npz(folder / file) for name, file in cell["supports"].items()}
    assert all(s.metadata["kernel"] == cell["kernel"] for s in supports.values())
    prepared = reprepare(next(iter(supports.values())), cache_dir=cache_dir)
    kernel_fn = kernels.make(KernelConfig(**cell["kernel"]))  # one kernel: conv_rf's test features computed once
    x, y = prepared.x_test[rows], prepared.y_test[rows]
    return {name: (np.argmax(evaluate.krr_predictions(kernel_fn, s.images, s.labels, x, cell["config"]["reg"]), axis=1), y)
            for name, s in supports.items()}


def assert_cell_scores_are_published(cell: dict, accuracy: dict[str, float]) -> None:
    """The cell's published KRR numbers are these per-support test accuracies (equal, not close)."""
    methods = cell["methods"]
    assert accuracy["kip"] == methods["kip"]["krr"]["mean"], json.dumps(accuracy)
    assert accuracy["kip_labels"] == methods["kip_labels"]["krr"]["mean"], json.dumps(accuracy)
    solves = [accuracy[f"label_solve_{repeat}"] for repeat in range(methods["label_solve"]["krr"]["n"])]
    assert np.mean(solves) == methods["label_solve"]["krr"]["mean"], json.dumps(accuracy)


def assert_cell_rescored_exactly(cell: dict, folder: Path, cache_dir: Path) -> None:
    """A cell's published numbers re-scored in full from its saved supports: the same computation on
    the same data (equal, not close)."""
    scores = cell_scores(cell, folder, cache_dir)
    assert_cell_scores_are_published(cell, {name: float(np.mean(p == y)) for name, (p, y) in scores.items()})


def block_of(key: str) -> slice:
    """The test rows re-scored for `key`: a fixed block per support set, different across them."""
    start = BLOCK * (zlib.crc32(key.encode()) % (10_000 // BLOCK))
    return slice(start, start + BLOCK)


def golden_file(support: Path) -> Path:
    """Where the recorded predictions of a committed support live."""
    return GOLDEN / (str(support.relative_to(ROOT).with_suffix("")).replace("/", "--") + ".npz")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_golden(support: Path) -> np.ndarray:
    """The recorded predicted class of each test image, after checking it was recorded for these bytes."""
    with np.load(golden_file(support)) as recorded:
        assert str(recorded["support_sha256"]) == sha256(support), f"{support} changed after its predictions were recorded"
        return recorded["predicted"].astype(np.int64)


def paper_cells() -> list[str]:
    return sorted(path.stem for path in (PAPER / "cells").glob("*.json"))


def benchmark_runs(pattern: str) -> list[str]:
    return sorted(path.name for path in BENCHMARKS.glob(pattern) if "saved" in json.loads(path.read_text()))
