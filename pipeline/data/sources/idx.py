"""Reader for the IDX format of MNIST-style files (LeCun et al.), raw or gzip-compressed.

Hand-written because it is short and every maintained reader pulls in a framework. The header is
read first; the data size it declares is checked against the file (raw) and against
`safe_read.MAX_ARRAY_BYTES` before anything is allocated, and gzip is inflated as a stream, never
past the declared size plus one byte, so a damaged or hostile file costs bounded memory and time.
"""
from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.artifacts import safe_read
from pipeline.errors import UserError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file (gzip detected from the magic); only regular files are opened."""
    with safe_read.open_regular(path, "an IDX file") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
        handle.seek(0)
        if compressed:
            with gzip.GzipFile(fileobj=handle) as stream:
                return _read(stream, str(path), size=None)
        return _read(handle, str(path), size=os.fstat(handle.fileno()).st_size)


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """Decode IDX bytes already in memory (gzip is detected from the magic); `what` names the file."""
    if data[:2] == _GZIP_MAGIC:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            return _read(stream, what, size=None)
    return _read(io.BytesIO(data), what, size=len(data))


def _read(stream: BinaryIO, what: str, size: int | None) -> np.ndarray:
    """Header, size checks, then exactly the declared data; `size` is the file size if known."""
    magic = _read_header_bytes(stream, 4, what)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
        raise UserError(f"{what} does not start with an IDX header; expected an MNIST-style IDX file")
    dtype = np.dtype(_DTYPES[magic[2]])
    ndim = magic[3]
    dims = _read_header_bytes(stream, 4 * ndim, what)
    if len(dims) < 4 * ndim:
        raise UserError(f"{what} is truncated inside its IDX header")
    shape = struct.unpack(f">{ndim}I", dims)
    promise = f"its header {shape}"
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: 65536**4 does not overflow
    if size is not None and size - 4 - 4 * ndim != nbytes:
        raise UserError(f"{what} holds {size - 4 - 4 * ndim} data bytes; {promise} promises {nbytes}")
    safe_read.check_declared(what, shape, dtype.itemsize)
    data = safe_read.read_exactly(stream, nbytes, what, promise)
    return data.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _read_header_bytes(stream: BinaryIO, count: int, what: str) -> bytes:
    try:
        return stream.read(count)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{what} cannot be read ({type(err).__name__}: {err}); expected IDX data, raw or gzip") from None
