"""Reading files that may be hostile or damaged, in bounded memory and time.

Data-source files come from users and downloads, and the pipeline's own .npz files (prepared.npz,
distilled sets) from DVC remotes, colleagues and damaged disks. So a file may be a FIFO (reading it
hangs), a symlink to /dev/zero (reading it never ends), a compression bomb, or carry a header
declaring an array far larger than the file. The rules here:

* Only regular files are opened, checked with `os.stat` before opening (opening a device or FIFO
  can block or have side effects) and again with `fstat` on the opened descriptor (the path may be
  swapped in between).
* Sizes declared by headers are computed with Python ints (no overflow) and checked against what
  the file holds and against a per-array cap (`MAX_ARRAY_BYTES` unless the caller needs another)
  before anything is allocated; compressed .npz members are also capped in total. An .npz's
  headers are all read before any member's data, so a caller can refuse the arrays as a whole
  (`read_npz(..., check=...)`: a distilled set's support size) before a byte of data is read.
* Compressed data is inflated as a stream, never beyond the declared size plus one byte (the byte
  that proves the file holds more than its header says).
* Anything a file says is quoted in one bounded line (`one_line`).

Hand-written rather than `np.load`: it trusts each member's header, so a damaged or hostile file
declaring a 400 GB array makes it allocate 400 GB. (Writing is `pipeline.artifacts.atomic`.)
"""
from __future__ import annotations

import collections
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from pipeline.errors import UserError

# One array may declare at most 256 MiB of data, the default of every reader here and the cap for
# raw data-source arrays (IDX and .npz data folders, the registry's decoded cache). MNIST's
# training images are 47 MB and CIFAR-10's 184 MB as uint8; the pipeline converts pixels to
# float32, so one array at this cap already becomes 1 GiB in memory. Anything larger is not a
# dataset KIP can use on one machine, and a header that claims more is far more likely damaged or
# hostile than real. Readers of derived files (float32 copies of these arrays) pass their own cap.
MAX_ARRAY_BYTES = 1 << 28

# The compressed .npz members one read may inflate to in total. Per-array caps bound each member;
# this bounds the sum over many members. A data folder's train.npz written by np.savez_compressed
# at the per-array cap inflates to ~256 MiB; the pipeline's own files are stored, not compressed.
MAX_INFLATED_BYTES = 1 << 30

NUMERIC_KINDS = "biufc"  # bool, signed/unsigned int, float, complex
STRING_KINDS = "US"  # the pipeline's own .npz files hold JSON metadata and names as string arrays

_CHUNK = 1 << 24  # inflate / copy 16 MiB at a time
_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile)  # gzip.BadGzipFile is an OSError

Names = Union[Iterable[str], Callable[[list[str]], Iterable[str]], None]
Header = tuple[tuple[int, ...], bool, np.dtype]  # shape, Fortran order, dtype of one .npy member
HeaderCheck = Callable[[dict[str, tuple[tuple[int, ...], np.dtype]]], None]


# --- regular files only ---------------------------------------------------------------------------

def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _not_regular(path: Path, mode: int, what: str) -> UserError:
    target = os.path.realpath(path)
    shown = f"{path} (-> {target})" if target != os.path.abspath(path) else str(path)
    if stat.S_ISDIR(mode):
        return UserError(f"{shown} is a directory; expected {what}")
    return UserError(f"{shown} is {_kind(mode)}, not a regular file; expected {what}")


def check_regular(path: Path, what: str) -> os.stat_result:
    """stat (following symlinks) and refuse anything but a regular file, without opening it: a FIFO
    would block a reader forever and /dev/zero would never end. `what` says what was expected."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; expected {what}") from None
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror}); expected {what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode, what)
    return info


def open_regular(path: Path, what: str) -> BinaryIO:
    """Open a regular file for binary reading; FIFOs, devices and directories are refused unopened."""
    check_regular(path, what)
    try:
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise UserError(f"{path} cannot be read ({err.strerror}); expected {what}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode, what)
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


# --- declared sizes and exact reads ---------------------------------------------------------------

def check_declared(
    what: str, shape: tuple[int, ...], itemsize: int, limit: int = MAX_ARRAY_BYTES,
    *, dtype: np.dtype | None = None, held: int | None = None,
) -> int:
    """Bytes of data an array header declares, refused above `limit` before anything is read.

    Given `held` (the data bytes the file really holds), also refused unless the two agree.
    """
    shape = tuple(shape)
    nbytes = math.prod(shape) * itemsize  # Python ints: 65536**4 does not overflow
    if nbytes > limit:
        declared = f"shape {shape} of {dtype}" if dtype is not None else f"an array of shape {shape}"
        holds = f" but holds {held} bytes" if held is not None and held != nbytes else ""
        raise UserError(
            f"{what} declares {declared} ({nbytes} bytes){holds}; "
            f"at most {limit} bytes ({limit >> 20} MiB) per array are allowed"
        )
    if held is not None and held != nbytes:
        header = f"its header {shape} {dtype}" if dtype is not None else f"its header {shape}"
        raise UserError(f"{what} holds {held} data bytes; {header} promises {nbytes}")
    return nbytes


def read_exactly(stream: BinaryIO, nbytes: int, what: str, promise: str) -> np.ndarray:
    """Exactly `nbytes` from `stream` as uint8, in chunks; fewer, or any byte more, is an error.

    Reads at most `nbytes + 1` bytes, so a compressed stream is never inflated past that. The last
    read reaches the end of a zip member, which makes `zipfile` check the member's CRC.
    """
    buffer = np.empty(nbytes, np.uint8)
    view = memoryview(buffer)
    done = 0
    try:
        while done < nbytes:
            chunk = stream.read(min(_CHUNK, nbytes - done))
            if not chunk:
                raise UserError(f"{what} holds {done} data bytes; {promise} promises {nbytes}")
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        extra = stream.read(1)
    except _READ_ERRORS as err:
        raise UserError(f"{what} cannot be read ({type(err).__name__}: {one_line(err)})") from None
    if extra:
        raise UserError(f"{what} holds more than the {nbytes} data bytes {promise} promises")
    return buffer


# --- .npz -----------------------------------------------------------------------------------------

def read_npz(
    path: Path,
    names: Names = None,
    *,
    max_array_bytes: int = MAX_ARRAY_BYTES,
    max_inflated: int = MAX_INFLATED_BYTES,
    strings: bool = False,
    check: HeaderCheck | None = None,
) -> dict[str, np.ndarray]:
    """Arrays of an .npz, each checked before anything is allocated for it.

    `names`: None for every member; the names to read; or a function given the sorted member names
    that returns the names to read. Checked first, over all members: names end in `.npy`, none
    twice, stored or deflated only, stored sizes consistent, none larger than the file. Then, over
    the members read: what compressed ones inflate to (at most `max_inflated` in total), and per
    member its .npy header (version 1.0/2.0, no objects or structured dtypes, kinds
    `NUMERIC_KINDS` plus `STRING_KINDS` if `strings`), its declared size (at most
    `max_array_bytes`, equal to the bytes the member holds). Then `check`, if given, with every
    member read's {name: (shape, dtype)}, to refuse the arrays as a whole (it raises UserError).
    Only then, per member, exactly its declared bytes (+1 byte probe, CRC checked). Any defect is a
    one-line UserError naming the file.
    """
    path = Path(path)
    kinds = NUMERIC_KINDS + (STRING_KINDS if strings else "")
    with open_regular(path, "an .npz file") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                infos = archive.infolist()
                _check_members(path, infos, os.fstat(handle.fileno()).st_size)
                members = {info.filename[: -len(".npy")]: info for info in infos}
                available = sorted(members)
                wanted = available if names is None else list(names(available) if callable(names) else names)
                missing = [name for name in wanted if name not in members]
                if missing:
                    raise UserError(f"{path} lacks arrays {one_line(missing)}; it has {one_line(available)}")
                _check_inflated(path, [members[name] for name in wanted], max_inflated)
                headers = {name: _member_header(path, archive, members[name], kinds, max_array_bytes) for name in wanted}
                if check is not None:
                    check({name: (shape, dtype) for name, (shape, _, dtype) in headers.items()})
                return {name: _read_member(path, archive, members[name], kinds, headers[name]) for name in wanted}
        except UserError:
            raise
        except (*_READ_ERRORS, zipfile.LargeZipFile, ValueError, NotImplementedError) as err:
            raise UserError(
                f"{path} is not a readable .npz file (corrupted or truncated: {type(err).__name__}: {one_line(err)})"
            ) from None


def _check_members(path: Path, infos: list[zipfile.ZipInfo], archive_size: int) -> None:
    """The member list as a whole: only .npy arrays, no name twice, sizes the archive can hold."""
    names = [info.filename for info in infos]
    for name in names:
        if not name.endswith(".npy"):
            raise UserError(f"{path} holds member {one_line(repr(name), 80)}; expected only .npy arrays")
    duplicated = sorted(name for name, count in collections.Counter(names).items() if count > 1)
    if duplicated:
        raise UserError(f"{path} holds two members named {one_line(repr(duplicated[0]), 80)}; the archive was altered or damaged")
    for info in infos:
        name = one_line(info.filename, 80)
        if info.compress_size > archive_size:
            raise UserError(f"{path}: member {name} claims {info.compress_size} bytes but the file has {archive_size}")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise UserError(f"{path}: member {name} is stored with inconsistent sizes; the file is damaged")
        elif info.compress_type != zipfile.ZIP_DEFLATED:
            raise UserError(f"{path}: member {name} uses compression {info.compress_type}; expected stored or deflated")


def _check_inflated(path: Path, infos: list[zipfile.ZipInfo], max_inflated: int) -> None:
    inflated = sum(info.file_size for info in infos if info.compress_type == zipfile.ZIP_DEFLATED)
    if inflated > max_inflated:
        raise UserError(
            f"{path}: compressed members would inflate to {inflated} bytes ({inflated / 2**30:.2f} GiB); "
            f"this reader accepts at most {max_inflated} bytes ({max_inflated / 2**30:.2f} GiB)"
        )


def _member_header(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, kinds: str, limit: int) -> Header:
    """One .npy member's header, with its declared size checked against `limit` and what it holds."""
    what = f"{path}: member {one_line(info.filename, 80)}"
    with archive.open(info) as member:
        shape, fortran_order, dtype = _read_header(what, member, kinds)
        held = info.file_size - member.tell()
    check_declared(what, shape, dtype.itemsize, limit, dtype=dtype, held=held)
    return shape, fortran_order, dtype


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, kinds: str, header: Header) -> np.ndarray:
    """One .npy member's data: exactly the bytes its (already checked) header declares."""
    what = f"{path}: member {one_line(info.filename, 80)}"
    shape, fortran_order, dtype = header
    with archive.open(info) as member:
        if _read_header(what, member, kinds) != header:  # the same bytes, read again: a file changed under us
            raise UserError(f"{what} changed while it was read; read it again")
        nbytes = math.prod(shape) * dtype.itemsize
        data = read_exactly(member, nbytes, what, f"its header {shape} {dtype}")
    return data.view(dtype).reshape(shape, order="F" if fortran_order else "C")


def _read_header(what: str, member: BinaryIO, kinds: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(member)
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    if version not in readers:
        raise UserError(f"{what} uses .npy format version {version}; expected 1.0 or 2.0")
    shape, fortran_order, dtype = readers[version](member)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds:
        expected = "plain numbers or strings (no objects)" if STRING_KINDS in kinds else "a numeric array"
        raise UserError(f"{what} has dtype {one_line(dtype, 80)}; expected {expected}")
    if any(d < 0 for d in shape):
        raise UserError(f"{what} declares a negative shape {shape}")
    return shape, fortran_order, dtype


def one_line(err: object, limit: int = 200) -> str:
    """An exception's (or any value's) text collapsed to one bounded line: hostile files can put
    anything in it."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
