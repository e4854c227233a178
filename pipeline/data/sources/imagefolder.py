"""`data.source: imagefolder`: data_dir/train/<class>/**/*.{png,jpg,jpeg,bmp,webp}, and optionally
data_dir/test/<class>/... (else a class-balanced test split is carved off by seed).

Class names are the train folder's sub-folder names, sorted by their bytes (the same order on every
machine and locale); a name that is not UTF-8 is kept with its odd bytes written as \\xNN. Files
are listed without following links out of data_dir: a symlink that leads outside it, a FIFO,
socket or device is unreadable (opening a FIFO would block forever), as is a file Pillow cannot
decode; `data.on_unreadable` decides whether that stops the run, naming the file, or is skipped and
counted. Hidden files and files without an image extension are ignored and counted. A class
folder with no readable image always stops the run: KIP needs images of every class.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from pipeline.data.sources import RawSplits
from pipeline.data.sources.encoded import Decoded, cache_key, cached, check_capacity, to_splits
from pipeline.data.sources.files import MAX_CLASSES
from pipeline.data.sources.images import EXTENSIONS, MAX_FILE_BYTES, DecodeReport, Unreadable, decode
from pipeline.errors import UserError
from pipeline.run.config import DataConfig

LAYOUT = "data_dir/train/<class>/*.png|jpg|jpeg|bmp|webp (and optionally data_dir/test/<class>/...)"


def shown(name: str | Path) -> str:
    """A file or class name as text: bytes that are not UTF-8 become \\xNN (no surrogates reach JSON)."""
    return os.fsencode(str(name)).decode("utf-8", "backslashreplace")


def load(config: DataConfig, cache_dir: Path) -> RawSplits:
    root = Path(config.data_dir or "")
    if not root.is_dir():
        raise UserError(f"data.data_dir={shown(root)!r} is not a directory; expected {LAYOUT}")
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir() or train_dir.is_symlink():
        raise UserError(f"data.data_dir={shown(root)!r} has no train/ folder; expected {LAYOUT}")
    report = DecodeReport()
    classes = _class_folders(train_dir)
    if not classes:
        raise UserError(f"{shown(train_dir)} holds no class folders; expected {LAYOUT}")
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{shown(train_dir)} holds {len(classes)} class folders; expected at most {MAX_CLASSES}")
    has_test = test_dir.is_dir() and not test_dir.is_symlink()
    listed = _list(root, train_dir, classes, False, config, report)
    if has_test:
        extra = sorted(set(_class_folders(test_dir)) - set(classes), key=os.fsencode)
        if extra:
            raise UserError(f"{shown(test_dir / extra[0])} is a test class with no train folder; expected the test "
                            f"classes to be among train's: {', '.join(shown(c) for c in classes[:10])}")
        listed += _list(root, test_dir, classes, True, config, report)
    for index, name in enumerate(classes):
        if not any(c == index and not t for _, _, c, t in listed):
            raise UserError(f"{shown(train_dir / name)} holds no readable image; expected at least one "
                            f"{'/'.join(EXTENSIONS)} file in every class folder")
    check_capacity(len(listed), config.channels, config.image_size, shown(root))
    settings = {"source": "imagefolder", "channels": config.channels, "image_size": config.image_size,
                "on_unreadable": config.on_unreadable}
    key = cache_key({**settings, "listing_skips": report.skipped_examples, "ignored": report.ignored},
                    [(rel, path) for rel, path, _, _ in listed])
    names = tuple(shown(c) for c in classes)

    def produce() -> Decoded:
        return _decode_all(listed, names, has_test, config, report)

    decoded = cached(cache_dir, "imagefolder", key, produce)
    return to_splits(decoded, seed=config.seed, test_fraction=config.test_fraction,
                     origin=f"imagefolder:{shown(root.resolve())}", settings=settings)


def _class_folders(directory: Path) -> list[str]:
    """Sub-folder names (not hidden, not symlinks), sorted by bytes."""
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    return sorted(names, key=os.fsencode)


def _list(root: Path, split_dir: Path, classes: list[str], is_test: bool, config: DataConfig,
          report: DecodeReport) -> list[tuple[str, Path, int, bool]]:
    """(name relative to data_dir, path, class index, is_test) of every image file, in byte order."""
    found = []
    real_root = root.resolve()
    for index, name in enumerate(classes):
        folder = split_dir / name
        if not folder.is_dir():
            continue  # a test folder may lack a class
        for path in _walk(folder):
            rel = shown(path.relative_to(root))
            if path.name.startswith(".") or path.suffix.lower() not in EXTENSIONS:
                report.ignored += 1
                continue
            try:
                _check_file(path, real_root)
            except Unreadable as err:
                _unreadable(path, err.reason, config, report)
                continue
            found.append((rel, path, index, is_test))
    return found


def _walk(folder: Path) -> list[Path]:
    """Every entry below `folder` that is not a directory, recursing into real sub-folders only."""
    out = []
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: os.fsencode(e.name)):
            if entry.is_dir(follow_symlinks=False):
                out.extend(_walk(Path(entry.path)))
            else:
                out.append(Path(entry.path))
    return out


def _check_file(path: Path, real_root: Path) -> None:
    """Only regular files inside data_dir, no larger than MAX_FILE_BYTES; checked without opening."""
    if path.is_symlink():
        target = path.resolve()
        if target != real_root and real_root not in target.parents:
            raise Unreadable("a symlink out of data.data_dir")
    try:
        info = os.stat(path)
    except OSError as err:
        raise Unreadable(f"cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise Unreadable("not a regular file (a FIFO, socket, device or folder)")
    if info.st_size > MAX_FILE_BYTES:
        raise Unreadable(f"larger than {MAX_FILE_BYTES >> 20} MiB")


def _unreadable(path: Path, reason: str, config: DataConfig, report: DecodeReport) -> None:
    if config.on_unreadable == "stop":
        raise UserError(f"{shown(path)}: {reason}; expected a PNG, JPEG, BMP or WebP image "
                        "(data.on_unreadable=skip skips and counts such files)")
    report.skip(shown(path), reason)


def _decode_all(listed: list[tuple[str, Path, int, bool]], names: tuple[str, ...], has_test: bool,
                config: DataConfig, report: DecodeReport) -> Decoded:
    from tqdm import tqdm

    size, channels = config.image_size, config.channels
    images = np.zeros((len(listed), size, size, channels), np.uint8)
    labels = np.zeros(len(listed), np.int32)
    is_test = np.zeros(len(listed), bool)
    kept = 0
    for _, path, index, test in tqdm(listed, desc="decode", unit="image", disable=None):
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
            images[kept] = decode(data, channels, size, report)
        except Unreadable as err:
            _unreadable(path, err.reason, config, report)
            continue
        except OSError as err:
            _unreadable(path, f"cannot be read ({err.strerror})", config, report)
            continue
        labels[kept], is_test[kept] = index, test
        kept += 1
    counts = np.bincount(labels[:kept][~is_test[:kept]], minlength=len(names))
    if (counts == 0).any():
        empty = names[int(np.argmin(counts))]
        raise UserError(f"class {empty!r} has no readable training image (all were skipped as unreadable); "
                        "expected at least one in every class")
    return Decoded(images[:kept].copy(), labels[:kept].copy(), is_test[:kept].copy() if has_test else None,
                   names, report.as_dict())
