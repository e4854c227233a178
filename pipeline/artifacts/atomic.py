"""Writing files: write-to-temp-then-rename, so a reader (or DVC) never sees a half-written file;
a deterministic .npz writer; strict (finite) JSON; and streaming digests of written files.

`save_npz` is hand-written rather than `np.savez`, which stamps members with the current time
(artifacts would never be byte-reproducible). Reading files that may be hostile or damaged,
including the .npz files written here, is `pipeline.artifacts.safe_read`.

Writes only ever replace regular files (never a symlink's target, a device or a directory), turn a
full or read-only disk into one `UserError` line, and sweep temp files that killed writers left.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import socket
import stat
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.errors import UserError

# A write that fails for one of these reasons is the machine's state, not a bug: one line, no traceback.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_LEGACY_TEMP_AGE = 600  # seconds: temp files from before the pid was in the name, untouched this long, are stale


# --- writing ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def replace_on_success(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    check_target(path)
    _make_parent(path)
    remove_stale_temps(path)
    tmp = _new_temp(path)
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        except OSError as err:
            raise _storage_error(path, err) from None
        check_target(path)  # something may have appeared there while we wrote
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_target(path: Path) -> None:
    """Only a regular file (or nothing) may be replaced: a symlink, device, FIFO or directory at
    `path` is somebody's, and renaming over it would destroy it."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise UserError(f"{path} cannot be written: a parent of it is a file, not a directory") from None
    except OSError as err:
        raise UserError(f"{path} cannot be written ({err.strerror})") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise UserError(f"{path} is a directory; expected a file path to write to")
    kind = "a symbolic link" if stat.S_ISLNK(mode) else "a device, FIFO or socket"
    raise UserError(f"{path} is {kind}, not a regular file; refusing to replace it (remove it or write elsewhere)")


def check_writable(path: Path) -> None:
    """Fail before an hour of computing, not after it: `path` must be replaceable (`check_target`)
    and its nearest existing directory must accept a new file (probed by creating one, since
    permission bits say nothing for root or on a read-only mount)."""
    path = Path(path)
    check_target(path)
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise UserError(f"{path} cannot be written: {directory} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kip-write-probe.", dir=directory)
    except OSError as err:
        raise UserError(f"{path} cannot be written: directory {directory} does not accept files ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"{path} cannot be written: a parent of it is a file, not a directory") from None
    except OSError as err:
        raise _storage_error(path, err) from None


def _storage_error(path: Path, err: OSError) -> Exception:
    """A full, read-only or forbidden disk as one line; any other OSError stays a bug."""
    code = err.errno
    if code is None and "No space left on device" in str(err):  # pyarrow reports errno in the text only
        code = errno.ENOSPC
    if code not in _STORAGE_ERRNOS:
        return err
    reason = os.strerror(code)
    return UserError(f"{path} could not be written ({reason}); nothing was written, any earlier file is unchanged")


def _new_temp(path: Path) -> Path:
    """`.{name}.{pid}-{host}.XXXXXXXX.tmp`: the pid lets a later writer tell a killed writer's
    leftovers from a live one's."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_HOST_TAG}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _storage_error(path, err) from None
    os.close(fd)
    return Path(name)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files of writes to `path` whose writer is dead (killed processes leave them:
    4 kills once left 262 MB). Returns what was removed."""
    path = Path(path)
    tagged = re.compile(re.escape(f".{path.name}.") + r"(\d+)-([0-9a-f]{8})\.\w+\.tmp")
    legacy = re.compile(re.escape(f".{path.name}.") + r"\w{8}\.tmp")
    removed = []
    try:
        candidates = list(path.parent.glob(f".{_glob_escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        match = tagged.fullmatch(candidate.name)
        if match:
            stale = match.group(2) == _HOST_TAG and not _alive(int(match.group(1)))
        else:
            stale = bool(legacy.fullmatch(candidate.name)) and _age(candidate) > _LEGACY_TEMP_AGE
        if stale and _unlink_regular(candidate):
            removed.append(candidate)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or a pid we cannot check): leave its file alone
    return True


def _age(path: Path) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _unlink_regular(path: Path) -> bool:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        path.unlink()
    except OSError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An .npz readable by `np.load`, byte-identical for identical arrays.

    `np.savez` stamps each member with the current time, which would make every run's artifact
    differ and defeat DVC's caching; we write the same zip layout with a fixed timestamp.
    """
    with replace_on_success(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def write_text(path: Path, text: str) -> None:
    with replace_on_success(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Write `obj` as strict JSON (+ newline); NaN/Infinity, which `json` would write as invalid
    tokens that DVC and other readers reject, is a one-line error naming the key."""
    write_text(path, finite_json(obj, str(path), indent=indent, sort_keys=sort_keys) + "\n")


def finite_json(obj: Any, owner: str, **dumps_kwargs: Any) -> str:
    """`json.dumps(obj, allow_nan=False)`, but the error names `owner` and the key path of the
    first non-finite number instead of json's "Out of range float values"."""
    found = first_non_finite(obj)
    if found is not None:
        where, value = found
        raise UserError(f"{owner}: {where}={value!r} is not a finite number; JSON cannot hold NaN/Infinity")
    return json.dumps(obj, allow_nan=False, **dumps_kwargs)


def first_non_finite(obj: Any, where: str = "") -> tuple[str, float] | None:
    """(key path like `privacy.ratios[3]`, value) of the first NaN/Infinity in nested JSON data."""
    if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
        return where or "(top level)", float(obj)
    if isinstance(obj, Mapping):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{where}[{i}]", value) for i, value in enumerate(obj))
    else:
        return None
    for child_where, value in items:
        found = first_non_finite(value, child_where)
        if found is not None:
            return found
    return None


def check_finite_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse to write NaN/Infinity: a non-finite support set or transform is a failed run, and
    writing it would hand the failure to every later stage."""
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            count = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise UserError(f"{path}: {name} has {count} NaN/Infinity values; refusing to write a non-finite array")


# --- digests ----------------------------------------------------------------------------------------

def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MB blocks (artifacts and downloads can be large)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
