"""Reader for the IDX format of MNIST-style files (LeCun et al.), raw or gzip-compressed.

Hand-written because it is 20 lines and every maintained reader pulls in a framework.
"""
from __future__ import annotations

import gzip
import struct

import numpy as np

from pipeline.errors import UserError

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, what: str) -> np.ndarray:
    """Decode IDX bytes (gzip is detected from the magic) into an array; `what` names the file in errors."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise UserError(f"{what} is not a readable gzip file ({err}); expected IDX data") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise UserError(f"{what} does not start with an IDX header; expected an MNIST-style IDX file")
    dtype = np.dtype(_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{what} is truncated inside its IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise UserError(
            f"{what} holds {len(data) - header} data bytes; its header {shape} promises {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))
