"""The distilled .npz: round trip, reproducible bytes, atomic writes, and clear errors."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from pipeline.artifacts import atomic, npz as artifacts
from pipeline.data import preprocess
from pipeline.errors import UserError
from pipeline.run.config import PreprocessConfig


def lineage(method: str = "zca", num_classes: int = 10) -> dict:
    """The metadata sections every reader needs (what `kip distill` writes, minus the extras)."""
    return {
        "data": {"source": "embedded", "name": "digits", "data_dir": None},
        "preprocess": {"method": method, "zca_reg": 0.1},
        "kernel": {"architecture": "fc"},
        "dataset": {"fingerprint": "ab" * 32, "class_names": [f"c{i}" for i in range(num_classes)]},
    }


def rewrite(path, **changes):
    """Replace members of a written .npz and re-seal its checksums, so the reader's later checks
    (not the checksum) are what a test exercises."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "checksums"}
    arrays.update(changes)
    arrays["checksums"] = np.array(json.dumps(artifacts.checksum_record(arrays), sort_keys=True))
    atomic.save_npz(path, arrays)


@pytest.fixture
def distilled(rng):
    images = rng.standard_normal((20, 4, 4, 1)).astype(np.float32)
    transform = preprocess.fit(PreprocessConfig("zca"), rng.random((50, 4, 4, 1)).astype(np.float32))
    return artifacts.DistilledSet(
        images=images,
        labels=rng.standard_normal((20, 10)).astype(np.float32),
        classes=np.repeat(np.arange(10), 2).astype(np.int32),
        transform=transform,
        metadata={**lineage(), "seed": 0},
    )


def test_round_trip_keeps_everything(distilled, tmp_path):
    path = tmp_path / "d.npz"
    artifacts.save_npz(path, distilled)
    loaded = artifacts.load_npz(path)
    np.testing.assert_array_equal(loaded.images, distilled.images)
    np.testing.assert_array_equal(loaded.labels, distilled.labels)
    np.testing.assert_array_equal(loaded.classes, distilled.classes)
    np.testing.assert_array_equal(loaded.transform.zca_matrix, distilled.transform.zca_matrix)
    assert loaded.metadata["kernel"] == {"architecture": "fc"}
    assert loaded.metadata["format_version"] == artifacts.FORMAT_VERSION


def test_same_content_same_bytes(distilled, tmp_path):
    artifacts.save_npz(tmp_path / "a.npz", distilled)
    artifacts.save_npz(tmp_path / "b.npz", distilled)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


def test_truncated_file_is_reported(distilled, tmp_path):
    path = tmp_path / "d.npz"
    artifacts.save_npz(path, distilled)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(UserError, match="truncated"):
        artifacts.load_npz(path)


def test_inconsistent_file_is_reported(distilled, tmp_path):
    path = tmp_path / "d.npz"
    artifacts.save_npz(path, distilled)
    with np.load(path) as data:
        labels = data["labels"]
    rewrite(path, labels=labels[:-1])
    with pytest.raises(UserError, match="20 images but labels"):
        artifacts.load_npz(path)


def test_foreign_npz_is_reported(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((3, 2, 2, 1)), labels=np.zeros((3, 10)), classes=np.zeros(3), metadata=np.array("{}"))
    with pytest.raises(UserError, match="lacks transform/"):
        artifacts.load_npz(path)


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "out.npz"
    with pytest.raises(RuntimeError):
        with atomic.replace_on_success(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "metrics.json", "{}\n")
    finally:
        os.umask(mask)
    assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644


def _one_hot(classes: np.ndarray, num_classes: int = 10) -> np.ndarray:
    from pipeline.distill import krr

    return krr.centered_one_hot(classes, num_classes)


@pytest.mark.parametrize("reader", ["npz", "parquet"])
@pytest.mark.parametrize("edit, message", [
    ("preprocess.method", "metadata preprocess.method='standardize' but the stored transform is 'zca'"),
    ("preprocess.zca_reg", "metadata preprocess.zca_reg=0.5 but the stored transform's is 0.1"),
    ("labels", "metadata says the labels were not learned (distill.learn_labels=false), but 20 label rows differ"),
    ("kernel", "is not the sha256 of its lineage sections (data, dataset, preprocess, kernel, distill): one of them was "
               "edited after distilling"),
])
def test_a_set_that_disagrees_with_itself_is_refused_though_its_checksums_are_resealed(distilled, tmp_path, reader,
                                                                                      edit, message):
    """Two parts of a file state the same fact; an edit of one (checksums re-sealed, as anyone can)
    is refused in one line on read, not scored. The unedited file reads, as the control."""
    from pipeline.artifacts import parquet

    metadata = {**distilled.metadata, "distill": {"method": "kip", "learn_labels": False}}
    metadata["params_hash"] = artifacts.params_hash(metadata)
    distilled = dataclasses.replace(distilled, labels=_one_hot(distilled.classes), metadata=metadata)
    path = tmp_path / f"set.{reader}"

    def save_and_load(candidate):
        if reader == "npz":
            artifacts.save_npz(path, candidate)
            return artifacts.load_npz(path)
        parquet.save_parquet(path, candidate, [f"c{i}" for i in range(10)])
        return parquet.read_parquet(path)

    save_and_load(distilled)  # the control
    metadata = json.loads(json.dumps(distilled.metadata))
    labels = distilled.labels
    if edit == "preprocess.method":
        metadata["preprocess"]["method"] = "standardize"
    elif edit == "preprocess.zca_reg":
        metadata["preprocess"]["zca_reg"] = 0.5
    elif edit == "kernel":
        metadata["kernel"] = {"architecture": "rbf", "gamma": 50.0}  # the auditor's edit: scored 0.889, exit 0
    else:
        labels = np.roll(labels, 1, axis=1)  # every image's label moved to the next class
    with pytest.raises(UserError, match=re.escape(message)) as raised:
        save_and_load(dataclasses.replace(distilled, labels=labels, metadata=metadata))
    assert "\n" not in str(raised.value)


def test_learned_labels_are_not_held_to_the_classes(distilled, tmp_path):
    path = tmp_path / "set.npz"
    learned = dataclasses.replace(distilled, metadata={**distilled.metadata, "distill": {"method": "kip", "learn_labels": True}})
    artifacts.save_npz(path, learned)
    np.testing.assert_array_equal(artifacts.load_npz(path).labels, distilled.labels)

