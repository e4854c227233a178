"""Reading data files that may be hostile or damaged, in bounded memory and time.

Data files come from users and downloads, so a file may be a FIFO (reading it hangs), a symlink to
/dev/zero (reading it never ends), a compression bomb, or carry a header declaring an array far
larger than the file. The rules here:

* Only regular files are opened, checked with `os.stat` before opening (opening a device or FIFO
  can block or have side effects) and again with `fstat` on the opened descriptor (the path may be
  swapped in between).
* Sizes declared by headers are computed with Python ints (no overflow) and checked against what
  the file can hold and against `MAX_ARRAY_BYTES` before anything is allocated.
* Compressed data is inflated as a stream, never beyond the declared size plus one byte (the byte
  that proves the file holds more than its header says).
"""
from __future__ import annotations

import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import UserError

# One array may declare at most 256 MiB of data. MNIST's training images are 47 MB and CIFAR-10's
# 184 MB as uint8; the pipeline converts pixels to float32, so one array at this cap already
# becomes 1 GiB in memory. Anything larger is not a dataset KIP can use on one machine, and a
# header that claims more is far more likely damaged or hostile than real.
MAX_ARRAY_BYTES = 1 << 28

_CHUNK = 1 << 24  # inflate / copy 16 MiB at a time
_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile)  # gzip.BadGzipFile is an OSError


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _not_regular(path: Path, mode: int, what: str) -> UserError:
    target = os.path.realpath(path)
    shown = f"{path} (-> {target})" if target != os.path.abspath(path) else str(path)
    return UserError(f"{shown} is {_kind(mode)}; expected {what} as a regular file")


def check_regular(path: Path, what: str) -> os.stat_result:
    """stat (following symlinks) and refuse anything but a regular file, without opening it."""
    try:
        info = os.stat(path)
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


def check_declared(what: str, shape: tuple[int, ...], itemsize: int, limit: int = MAX_ARRAY_BYTES) -> int:
    """Bytes of data an array header declares, refused above `limit` before anything is read."""
    nbytes = math.prod(shape) * itemsize
    if nbytes > limit:
        raise UserError(
            f"{what} declares an array of shape {tuple(shape)} ({nbytes} bytes); "
            f"at most {limit} bytes ({limit >> 20} MiB) per array are allowed"
        )
    return nbytes


def read_exactly(stream: BinaryIO, nbytes: int, what: str, promise: str) -> np.ndarray:
    """Exactly `nbytes` from `stream` as uint8, in chunks; fewer, or any byte more, is an error.

    Reads at most `nbytes + 1` bytes, so a compressed stream is never inflated past that.
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
        raise UserError(f"{what} cannot be read ({type(err).__name__}: {err})") from None
    if extra:
        raise UserError(f"{what} holds more than the {nbytes} data bytes {promise} promises")
    return buffer


def read_npz(path: Path, pick: Callable[[list[str]], Iterable[str]]) -> dict[str, np.ndarray]:
    """The arrays `pick(member names)` selects from an .npz, each checked before it is inflated.

    Every member's .npy header is read first and its declared size compared with the member's
    size in the zip directory and with MAX_ARRAY_BYTES; only then is its data read.
    """
    with open_regular(path, "an .npz file") as handle:
        try:
            with zipfile.ZipFile(handle) as archive:
                members = {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}
                wanted = list(pick(sorted(members)))
                missing = [name for name in wanted if name not in members]
                if missing:
                    raise UserError(f"{path} lacks arrays {missing}; it has {sorted(members)}")
                return {name: _read_member(archive, members[name], f"{path}:{name}") for name in wanted}
        except UserError:
            raise
        except (*_READ_ERRORS, ValueError, NotImplementedError) as err:
            raise UserError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> np.ndarray:
    """One .npy member: header, declared size checks, then exactly the declared data."""
    fmt = np.lib.format
    with archive.open(info) as member:
        version = fmt.read_magic(member)
        readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
        if version not in readers:
            raise UserError(f"{what} uses .npy format version {version}; expected 1.0 or 2.0")
        shape, fortran_order, dtype = readers[version](member)
        header_size = member.tell()
        if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biufc":
            raise UserError(f"{what} has dtype {dtype}; expected a numeric array")
        nbytes = check_declared(what, shape, dtype.itemsize)
        if info.file_size - header_size != nbytes:
            raise UserError(
                f"{what} holds {info.file_size - header_size} data bytes; its header {tuple(shape)} {dtype} promises {nbytes}"
            )
        data = read_exactly(member, nbytes, what, f"its header {tuple(shape)} {dtype}")
    return data.view(dtype).reshape(shape, order="F" if fortran_order else "C")
