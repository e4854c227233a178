"""Every committed support set behind a published number re-scores to that number.

The README and docs quote KRR test accuracies of supports committed to git: the ConvNet-kernel runs
of `benchmarks/conv_kip.py` (`benchmarks/results/supports/`, the issue-14 goal numbers) and the
paper matrix's cells (`experiments/paper/results/supports/<cell>/`, kept in git since the DVC remote
of the machine that ran the earlier cells died with it). Each is re-scored here from the file alone,
on MNIST / Fashion-MNIST's real test split, with the code of this commit: a changed evaluation
kernel, preprocessing or scoring path, or a support edited after its number was written, fails
here. A cell whose supports are not in git must be named in `SUPPORTS_LOST` (the README says why),
so a published number can never silently lose the file behind it.

Equal, not close: the same computation on the same data, on the machine type and library versions
that wrote the numbers (the README's determinism promise); on another CPU model a near-tie
prediction may flip (README "Guarantees").

These are regression guards (marker `golden`): they compare with numbers an earlier run of the same
scoring path published, so they prove re-scorability, not correctness. The kernels' correctness is
held against independent references in tests/test_conv_features.py (neural-tangents' exact kernel)
and tests/test_krr.py (scikit-learn).

Most of the time here is the random ConvNets' features of the 10,000 test images. Supports scored
under the same evaluation networks, test images and code path share them: `_shared_features`
computes each distinct (networks, images, path) once per test session, with the library's own
function, so every score is the same computation as an uncached one.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from rescoring import assert_cell_rescored_exactly
from test_benchmark_reports import _benchmark_module

pytestmark = pytest.mark.golden

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "experiments" / "paper" / "results"
BENCHMARKS = ROOT / "benchmarks" / "results"

# Cells whose numbers are committed but whose supports were only `dvc push`ed to the remote in the
# home of a machine that is gone (README "Reproducing the paper"). Shrinks as cells re-run.
SUPPORTS_LOST = {
    f"{dataset}-{kernel}-{spc}"
    for dataset in ("mnist", "fashion_mnist")
    for kernel in ("fc_ntk", "fc_nngp", "rbf")
    for spc in (1, 10, 50)
}


@pytest.fixture(scope="module")
def _shared_features():
    """`conv_features.feature_rows` remembered by the sha256 of everything it reads (the networks'
    parameters, the images, the settings): a second support under the same draw gets the very array
    the first one's call returned."""
    import hashlib

    import jax

    from pipeline import conv_features

    compute, memory = conv_features.feature_rows, {}

    def remembered(params, x, config, block_size=1000, one_network_at_a_time=False):
        digest = hashlib.sha256(repr((config, block_size, one_network_at_a_time)).encode())
        for leaf in [*jax.tree_util.tree_leaves(params), np.ascontiguousarray(x, np.float32)]:
            leaf = np.asarray(leaf)
            digest.update(repr((leaf.dtype, leaf.shape)).encode() + leaf.tobytes())
        key = digest.hexdigest()
        if key not in memory:
            memory[key] = compute(params, x, config, block_size, one_network_at_a_time)
            memory[key].setflags(write=False)
        return memory[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv_features, "feature_rows", remembered)
        yield memory


def _cells() -> list[str]:
    return sorted(path.stem for path in (PAPER / "cells").glob("*.json"))


def _in_git(folder: Path) -> set[str]:
    """Files git tracks under `folder` (an untracked folder a local `dvc repro` left does not count)."""
    out = subprocess.run(["git", "ls-files", "--", str(folder)], cwd=ROOT, capture_output=True, text=True, check=True)
    return {Path(line).name for line in out.stdout.splitlines()}


def test_every_committed_cell_has_its_supports_in_git_or_is_named_lost():
    """The lost list is exact: every name in it is a committed cell without supports in git, and
    every other committed cell has them."""
    cells = set(_cells())
    assert cells and SUPPORTS_LOST <= cells, sorted(SUPPORTS_LOST - cells)
    with_supports = {key for key in cells if _in_git(PAPER / "supports" / key)}
    assert cells - with_supports == SUPPORTS_LOST
    assert with_supports, "no paper cell's supports are in git: nothing below re-scores a matrix number"


@pytest.mark.registry
@pytest.mark.slow
@pytest.mark.parametrize("key", [key for key in _cells() if key not in SUPPORTS_LOST])
def test_a_paper_cells_committed_supports_rescore_to_its_published_numbers(key, registry_cache, _shared_features):
    cell = json.loads((PAPER / "cells" / f"{key}.json").read_text())
    folder = PAPER / "supports" / key
    assert {name for name in _in_git(folder) if name.endswith(".npz")} == set(cell["supports"].values())
    assert_cell_rescored_exactly(cell, folder, registry_cache)


def _benchmark_runs(pattern: str) -> list[str]:
    return sorted(path.name for path in BENCHMARKS.glob(pattern) if "saved" in json.loads(path.read_text()))


def test_every_saved_support_a_benchmark_names_is_committed_with_the_bytes_it_recorded():
    names = _benchmark_runs("*.json")
    assert set(_benchmark_runs("conv_kip_*.json")) < set(names)  # transfer_finite_kip.json too
    tracked = _in_git(BENCHMARKS / "supports")
    for name in names:
        run = json.loads((BENCHMARKS / name).read_text())
        saved = ROOT / "benchmarks" / run["saved"]
        assert saved.name in tracked, name
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == run["saved_sha256"], name


@pytest.mark.registry
@pytest.mark.slow
@pytest.mark.parametrize("name", _benchmark_runs("conv_kip_*.json"))
def test_a_conv_kip_benchmarks_saved_support_rescores_to_its_published_number(name, registry_cache, monkeypatch,
                                                                            _shared_features):
    """`benchmarks/conv_kip.py rescore` itself, from the file and its recorded evaluation kernel."""
    run = json.loads((BENCHMARKS / name).read_text())
    bench, saved = _benchmark_module("conv_kip"), ROOT / "benchmarks" / run["saved"]
    assert bench._load_support(saved).metadata["evaluation_kernel"] == run["evaluation_kernel"]
    monkeypatch.setenv("KIP_CACHE_DIR", str(registry_cache))  # rescore's data cache: the session's
    rescored = bench.rescore(argparse.Namespace(support=saved))
    assert rescored["krr_test_accuracy"] == run["krr_test_accuracy"]["kip"]
