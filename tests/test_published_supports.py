"""Every committed support set behind a published number re-scores to that number.

The README and docs quote KRR test accuracies of supports committed to git: the ConvNet-kernel runs
of `benchmarks/conv_kip.py` (`benchmarks/results/supports/`, the issue-14 goal numbers) and the
paper matrix's cells (`experiments/paper/results/supports/<cell>/`, kept in git since the DVC remote
of the machine that ran the earlier cells died with it). A cell whose supports are not in git must
be named in `SUPPORTS_LOST` (docs/reproduction.md says why), so a published number can never silently lose
the file behind it.

What is checked, per support: tests/golden/predictions holds the predicted class of each of the
10,000 test images, recorded by a full scoring of the file with the library
(tests/golden/record_predictions.py, which writes nothing unless they give the published number)
and bound to the support's sha256; here (1) those predictions give the published number exactly,
and (2) one block of 1,000 test images, scored again from the file with the code of this commit,
gives exactly the recorded predictions. The block differs between supports (`rescoring.block_of`)
and is a whole block of the scoring paths' blocked computation, so its rows are the same
computation as in the full scoring (equal, not close). A changed evaluation kernel, preprocessing
or scoring path moves predictions in every block; a support edited after its number was written
fails the sha256. The full re-score of every number is `python tests/golden/record_predictions.py`
(about ten minutes; docs/testing.md).

Equal holds on the machine type and library versions that wrote the numbers (the README's
determinism promise); on another CPU model a near-tie prediction may flip (docs/testing.md "Guarantees, and the tests that check them").

These are regression guards (marker `golden`): they compare with numbers an earlier run of the same
scoring path published, so they prove re-scorability, not correctness. The kernels' correctness is
held against independent references in tests/test_conv_features.py (neural-tangents' exact kernel)
and tests/test_krr.py (scikit-learn).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rescoring import (BENCHMARKS, GOLDEN, PAPER, ROOT, assert_cell_scores_are_published, benchmark_runs, block_of,
                       cell_scores, golden_file, load_golden, paper_cells)
from test_benchmark_reports import _benchmark_module

pytestmark = pytest.mark.golden

# Cells whose numbers are committed but whose supports were only `dvc push`ed to the remote in the
# home of a machine that is gone (docs/reproduction.md "Supports live in git"). Shrinks as cells re-run.
# The 10- and 100-image FC and RBF cells re-ran on 2026-12-07 with their supports committed.
SUPPORTS_LOST = {f"{dataset}-{kernel}-50" for dataset in ("mnist", "fashion_mnist") for kernel in ("fc_ntk", "fc_nngp", "rbf")}


def _in_git(folder: Path) -> set[str]:
    """Files git tracks under `folder` (an untracked folder a local `dvc repro` left does not count)."""
    out = subprocess.run(["git", "ls-files", "--", str(folder)], cwd=ROOT, capture_output=True, text=True, check=True)
    return {Path(line).name for line in out.stdout.splitlines()}


def _published_supports() -> list[Path]:
    cells = [PAPER / "supports" / key / file for key in paper_cells() if key not in SUPPORTS_LOST
             for file in json.loads((PAPER / "cells" / f"{key}.json").read_text())["supports"].values()]
    runs = [ROOT / "benchmarks" / json.loads((BENCHMARKS / name).read_text())["saved"]
            for name in benchmark_runs("conv_kip_*.json")]
    return cells + runs


def test_every_committed_cell_has_its_supports_in_git_or_is_named_lost():
    """The lost list is exact: every name in it is a committed cell without supports in git, and
    every other committed cell has them."""
    cells = set(paper_cells())
    assert cells and SUPPORTS_LOST <= cells, sorted(SUPPORTS_LOST - cells)
    with_supports = {key for key in cells if _in_git(PAPER / "supports" / key)}
    assert cells - with_supports == SUPPORTS_LOST
    assert with_supports, "no paper cell's supports are in git: nothing below re-scores a matrix number"


def test_every_published_support_has_recorded_predictions_and_nothing_else_does():
    expected = {golden_file(support).name for support in _published_supports()}
    assert {path.name for path in GOLDEN.glob("*.npz")} == expected
    assert _in_git(GOLDEN) >= expected, "recorded predictions not committed"


@pytest.mark.registry
@pytest.mark.parametrize("key", [key for key in paper_cells() if key not in SUPPORTS_LOST])
def test_a_paper_cells_committed_supports_rescore_to_its_published_numbers(key, registry_cache):
    from pipeline.artifacts import npz as artifacts

    cell = json.loads((PAPER / "cells" / f"{key}.json").read_text())
    folder = PAPER / "supports" / key
    assert {name for name in _in_git(folder) if name.endswith(".npz")} == set(cell["supports"].values())
    recorded = {name: load_golden(folder / file) for name, file in cell["supports"].items()}
    rows = block_of(key)
    rescored = cell_scores(cell, folder, registry_cache, rows)
    y_test = rescored["kip"][1]
    for name, (predicted, y_block) in rescored.items():
        np.testing.assert_array_equal(predicted, recorded[name][rows], err_msg=name)
    full_labels = _test_labels(artifacts.load_npz(folder / cell["supports"]["kip"]).metadata, registry_cache)
    np.testing.assert_array_equal(full_labels[rows], y_test)
    assert_cell_scores_are_published(cell, {name: float(np.mean(p == full_labels)) for name, p in recorded.items()})


def _test_labels(metadata: dict, cache_dir: Path) -> np.ndarray:
    """The labels of the test split a support's metadata names (cheap: no kernel)."""
    from pipeline.data.datasets import load_dataset
    from pipeline.run.config import DataConfig

    return load_dataset(DataConfig(**metadata["data"]), cache_dir).y_test


def test_every_saved_support_a_benchmark_names_is_committed_with_the_bytes_it_recorded():
    import hashlib

    names = benchmark_runs("*.json")
    assert set(benchmark_runs("conv_kip_*.json")) < set(names)  # transfer_finite_kip.json too
    tracked = _in_git(BENCHMARKS / "supports")
    for name in names:
        run = json.loads((BENCHMARKS / name).read_text())
        saved = ROOT / "benchmarks" / run["saved"]
        assert saved.name in tracked, name
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == run["saved_sha256"], name


@pytest.mark.registry
@pytest.mark.parametrize("name", benchmark_runs("conv_kip_*.json"))
def test_a_conv_kip_benchmarks_saved_support_rescores_to_its_published_number(name, registry_cache):
    """`benchmarks/conv_kip.py`'s own re-scoring (`rescore_predictions`, what `rescore` prints), from
    the file and its recorded evaluation kernel."""
    run = json.loads((BENCHMARKS / name).read_text())
    bench, saved = _benchmark_module("conv_kip"), ROOT / "benchmarks" / run["saved"]
    assert bench._load_support(saved).metadata["evaluation_kernel"] == run["evaluation_kernel"]
    recorded, rows = load_golden(saved), block_of(name)
    outputs, y_block = bench.rescore_predictions(saved, registry_cache, rows)
    np.testing.assert_array_equal(np.argmax(outputs, axis=1), recorded[rows])
    full_labels = _test_labels(bench._load_support(saved).metadata, registry_cache)
    np.testing.assert_array_equal(full_labels[rows], y_block)
    assert float(np.mean(recorded == full_labels)) == run["krr_test_accuracy"]["kip"]
