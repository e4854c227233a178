"""The distilled Parquet artifact and `kip inspect`: round trip, the documented one-line reads,
reproducible bytes, and damage that must be caught (altered rows, truncation, a foreign ZCA)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_artifacts import lineage

from pipeline.artifacts import npz as artifacts, parquet
from pipeline.artifacts.inspection import inspect_artifact
from pipeline.data import preprocess
from pipeline.errors import UserError
from pipeline.run.cli import main
from pipeline.run.config import PreprocessConfig

CLASS_NAMES = [f"c{i}" for i in range(10)]


def _distilled(rng, method: str) -> artifacts.DistilledSet:
    transform = preprocess.fit(PreprocessConfig(method), rng.random((50, 4, 4, 3)).astype(np.float32))
    return artifacts.DistilledSet(
        images=rng.standard_normal((20, 4, 4, 3)).astype(np.float32),
        labels=rng.standard_normal((20, 10)).astype(np.float32),
        classes=np.repeat(np.arange(10), 2).astype(np.int32),
        transform=transform,
        metadata={**lineage(method), "seed": 3, "steps": 7},
    )


@pytest.fixture(params=["standardize", "zca"])
def written(request, rng, tmp_path):
    """(distilled set, parquet path) with the sibling .npz the pipeline always writes beside it."""
    distilled = _distilled(rng, request.param)
    artifacts.save_npz(tmp_path / "distilled.npz", distilled)
    path = tmp_path / "distilled.parquet"
    parquet.save_parquet(path, distilled, CLASS_NAMES)
    return distilled, path


def test_round_trip_keeps_rows_and_lineage(written):
    distilled, path = written
    loaded = parquet.read_parquet(path)
    np.testing.assert_array_equal(loaded.images, distilled.images)
    np.testing.assert_array_equal(loaded.labels, distilled.labels)
    np.testing.assert_array_equal(loaded.classes, distilled.classes)
    assert loaded.metadata == distilled.metadata
    np.testing.assert_array_equal(loaded.transform.channel_mean, distilled.transform.channel_mean)
    assert loaded.transform.method == distilled.transform.method
    np.testing.assert_array_equal(loaded.transform.zca_matrix.reshape(-1), distilled.transform.zca_matrix.reshape(-1))
    assert loaded.transform.checksum() == distilled.transform.checksum()


def test_a_zca_parquet_is_usable_alone(rng, tmp_path):
    """What `dvc artifacts get ... distilled` delivers: the Parquet file, no .npz beside it."""
    distilled = _distilled(rng, "zca")
    path = tmp_path / "alone" / "distilled.parquet"
    path.parent.mkdir()
    parquet.save_parquet(path, distilled, CLASS_NAMES)
    assert sorted(p.name for p in path.parent.iterdir()) == ["distilled.parquet"]
    loaded = parquet.read_parquet(path)
    np.testing.assert_array_equal(loaded.transform.zca_matrix, distilled.transform.zca_matrix)
    new_images = rng.random((5, 4, 4, 3)).astype(np.float32)  # preprocess new data exactly as the run did
    np.testing.assert_array_equal(loaded.transform.apply(new_images), distilled.transform.apply(new_images))
    assert inspect_artifact(path)["valid"]


def test_the_matrix_stays_out_of_the_rows_pandas_loads(rng, tmp_path):
    path = tmp_path / "distilled.parquet"
    parquet.save_parquet(path, _distilled(rng, "zca"), CLASS_NAMES)
    assert b"kip.zca_matrix" in pq.ParquetFile(path).metadata.metadata
    assert b"kip.zca_matrix" not in pq.read_table(path).schema.metadata


def test_pandas_and_pyarrow_read_it_in_one_line(written):
    import pandas as pd

    distilled, path = written
    frame = pd.read_parquet(path)
    assert list(frame.columns) == ["index", "class", "class_name", "label", "image"]
    assert frame["class_name"].tolist() == [CLASS_NAMES[c] for c in distilled.classes]
    shape = json.loads(pq.read_schema(path).metadata[b"kip.image_shape"])
    images = np.stack(frame["image"].to_numpy()).reshape(-1, *shape)
    np.testing.assert_array_equal(images, distilled.images)
    np.testing.assert_array_equal(np.stack(frame["label"].to_numpy()), distilled.labels)


def test_same_content_same_bytes(rng, tmp_path):
    distilled = _distilled(rng, "standardize")
    for name in ("a.parquet", "b.parquet"):
        parquet.save_parquet(tmp_path / name, distilled, CLASS_NAMES, )
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def test_altered_rows_fail_the_checksum(written):
    _, path = written
    table = pq.read_table(path)
    images = table.column("image").combine_chunks()
    values = images.flatten().to_numpy().copy()
    values[0] += 1.0
    altered = table.set_column(
        table.column_names.index("image"), "image",
        pa.FixedSizeListArray.from_arrays(pa.array(values), images.type.list_size),
    )
    pq.write_table(altered.replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(UserError, match="column 'image' does not match the stored checksum"):
        parquet.read_parquet(path)


def test_truncated_and_foreign_files_are_reported(written, tmp_path):
    _, path = written
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupted or truncated"):
        parquet.read_parquet(path)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(UserError, match="lacks schema metadata kip.format_version"):
        parquet.read_parquet(foreign)


def test_inspect_validates_and_reports_lineage(written, capsys):
    distilled, path = written
    for artifact in (path, path.with_suffix(".npz")):
        assert main(["inspect", str(artifact)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["valid"] and report["images"] == 20 and report["image_shape"] == [4, 4, 3]
        assert report["images_per_class"] == [2] * 10
        assert report["preprocessing"] == distilled.transform.method
        assert report["seed"] == 3 and report["steps"] == 7


def test_inspect_catches_a_zca_matrix_that_is_not_the_one_recorded(rng, tmp_path):
    distilled = _distilled(rng, "zca")
    path = tmp_path / "distilled.parquet"
    parquet.save_parquet(path, distilled, CLASS_NAMES)
    table = pq.read_table(path)  # the rows and the sealed kip.* strings, with another run's matrix
    other = _distilled(np.random.default_rng(99), "zca").transform.zca_matrix
    parquet.write_sealed(path, table, {"kip.zca_matrix": np.ascontiguousarray(other, "<f8").tobytes()})
    with pytest.raises(UserError, match="does not match the sha256 kip.transform records"):
        inspect_artifact(path)


@pytest.mark.parametrize("name, fragment", [
    ("missing.parquet", "does not exist"),
    ("notes.txt", "expected .parquet or .npz"),
])
def test_inspect_errors_are_one_line(tmp_path, capsys, name, fragment):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["inspect", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
