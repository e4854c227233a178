"""A checkpoint is resumed only by the run that wrote it: same params, data, code and libraries.

The defect this guards against: an edited kernel formula, then `dvc repro`, resumed the old
checkpoint at its last step and wrote the old result under the new code's lock entry. Here every
file on distill's dependency path (read from dvc.yaml, so a new dep cannot be forgotten) is
changed by one byte in a copy of the package, and the same run must start afresh.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.data.prepared import Prepared, prepare
from pipeline.errors import UserError
from pipeline.run import workflow
from pipeline.run.config import DataConfig, DistillConfig, KernelConfig, PreprocessConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = DistillConfig(support_per_class=1, steps=2, target_batch=100, checkpoint_every=1, learning_rate=0.01)


def distill_deps() -> list[str]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["distill"]["deps"]


def package_deps() -> list[str]:
    return sorted(d for d in distill_deps() if d.startswith("pipeline/"))


def test_every_distill_dep_is_covered_by_the_key():
    """Package files are hashed; the prepared data enters as its arrays and provenance; the stage
    script only writes the finished result, so resuming cannot change what it writes."""
    others = sorted(set(distill_deps()) - set(package_deps()))
    assert others == ["data/prepared.npz", "stages/distill.py"]
    hashed = {p.relative_to(REPO).as_posix() for p in (REPO / "pipeline").rglob("*.py")}
    for dep in package_deps():
        files = {h for h in hashed if h == dep or h.startswith(dep.rstrip("/") + "/")}
        assert files, f"{dep} is a distill dep but no hashed source file"


@pytest.fixture(scope="module")
def prepared() -> Prepared:
    return prepare(DataConfig("embedded", "digits"), PreprocessConfig("standardize"), cache_dir=Path("/nonexistent"))


def _run(prepared: Prepared, checkpoint: Path, capsys) -> str:
    workflow.distill(prepared, KernelConfig(), CONFIG, checkpoint=checkpoint, progress=False)
    return capsys.readouterr().err


def test_one_byte_in_any_dep_starts_afresh(prepared, tmp_path, monkeypatch, capsys):
    package = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(workflow, "PACKAGE_DIR", package)
    checkpoint = tmp_path / "run.ckpt.npz"
    _run(prepared, checkpoint, capsys)
    assert "resuming from" in _run(prepared, checkpoint, capsys)  # the control: unchanged code resumes
    for dep in package_deps():
        files = [package / dep[len("pipeline/"):]]
        if files[0].is_dir():
            files = sorted(files[0].rglob("*.py"))
        for path in files:
            original = path.read_bytes()
            path.write_bytes(original + b"\n")
            err = _run(prepared, checkpoint, capsys)
            assert "resuming" not in err and "belongs to other params or code" in err, path
            path.write_bytes(original)
            err = _run(prepared, checkpoint, capsys)  # back to the original code: afresh again, re-keyed
            assert "belongs to other params or code" in err, path


@pytest.fixture(scope="module")
def finished_checkpoint(prepared, tmp_path_factory) -> Path:
    """The checkpoint a run of CONFIG leaves under the installed libraries, written once; tests copy it."""
    checkpoint = tmp_path_factory.mktemp("finished") / "run.ckpt.npz"
    workflow.distill(prepared, KernelConfig(), CONFIG, checkpoint=checkpoint, progress=False)
    return checkpoint


@pytest.mark.parametrize("library", ["jax", "jaxlib", pytest.param("neural-tangents", marks=pytest.mark.exact), "numpy", "optax"])
def test_another_library_version_starts_afresh(prepared, finished_checkpoint, tmp_path, monkeypatch, capsys, library):
    checkpoint = tmp_path / "run.ckpt.npz"
    shutil.copyfile(finished_checkpoint, checkpoint)
    capsys.readouterr()
    versions = workflow._library_versions()
    monkeypatch.setattr(workflow, "_library_versions", lambda: {**versions, library: versions[library] + ".post1"})
    err = _run(prepared, checkpoint, capsys)
    assert "resuming" not in err and "belongs to other params or code" in err


@pytest.mark.parametrize("victim", ["parquet", "npz", "text", "directory", "symlink"])
def test_a_file_that_is_not_a_checkpoint_is_never_overwritten(prepared, tmp_path, victim):
    """`--checkpoint victim.parquet` by mistake: the run stops before its first step instead of
    replacing the user's file at the first save."""
    path = tmp_path / "victim"
    if victim == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"a": [1, 2]}), path)
    elif victim == "npz":
        with open(path, "wb") as handle:
            np.savez(handle, images=np.zeros(3))
    elif victim == "text":
        path.write_text("notes")
    elif victim == "directory":
        path.mkdir()
    else:
        (tmp_path / "target").write_text("notes")
        path.symlink_to(tmp_path / "target")
    before = None if path.is_dir() else path.read_bytes()
    with pytest.raises(UserError, match="is not a kip checkpoint") as failure:
        workflow.distill(prepared, KernelConfig(), CONFIG, checkpoint=path, progress=False)
    assert "\n" not in str(failure.value) and str(path) in str(failure.value)
    assert path.is_dir() if victim == "directory" else path.read_bytes() == before
    assert path.is_symlink() == (victim == "symlink")
