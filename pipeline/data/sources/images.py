"""Decoding encoded images (PNG, JPEG, BMP, WebP) into one fixed shape, for the imagefolder and parquet
sources: what both share, so that a folder and a Parquet file of the same images give the same pixels.

Each image is opened by Pillow restricted to those four formats, with Pillow's decompression-bomb
limit on and its warning band turned into a refusal (an image over `Image.MAX_IMAGE_PIXELS` pixels is
never decoded), rotated by its EXIF orientation, converted to the requested mode (L for 1 channel,
RGB for 3: alpha is dropped, palettes expanded) and resized to `size` x `size` with Pillow's
antialiased bilinear filter, which stretches non-square images (as torchvision's `Resize((s, s))`
does). Anything Pillow cannot read is an `Unreadable` with a short reason; the caller decides,
by `data.on_unreadable`, whether it stops the run or is skipped and counted.
"""
from __future__ import annotations

import io
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.artifacts.safe_read import one_line

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
MODES = {1: "L", 3: "RGB"}
RESAMPLE = "bilinear (Pillow, antialiased)"  # stated in lineage: how a resized image was made
MAX_FILE_BYTES = 64 << 20  # a larger file is not a training image; read no further
# Bumped whenever decoding changes what pixels come out, so cached decodes are not reused.
DECODER_VERSION = "1"


class Unreadable(Exception):
    """One file or row that cannot become an image; `reason` is a short phrase for counts and errors."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DecodeReport:
    """What decoding did, for `prepare`'s report and the dataset's lineage."""

    read: int = 0
    resized: int = 0
    converted: int = 0  # mode changed (e.g. RGBA -> RGB, RGB -> L, palette -> RGB)
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_examples: list[str] = field(default_factory=list)  # the first few, named
    ignored: int = 0  # files without an image extension, or hidden

    def skip(self, name: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(f"{name}: {reason}")

    def as_dict(self) -> dict[str, object]:
        return {"read": self.read, "resized": self.resized, "converted": self.converted,
                "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(sorted(self.skipped.items())),
                "skipped_examples": list(self.skipped_examples), "ignored": self.ignored}


def decode(data: bytes, channels: int, size: int, report: DecodeReport) -> np.ndarray:
    """`data` as a (size, size, channels) uint8 array; raises Unreadable with the reason."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > MAX_FILE_BYTES:
        raise Unreadable(f"larger than {MAX_FILE_BYTES >> 20} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                image.load()
                image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Unreadable(f"decompression bomb (over {Image.MAX_IMAGE_PIXELS} pixels)") from None
    except UnidentifiedImageError:
        raise Unreadable(f"not an image ({'/'.join(FORMATS)} expected)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # Pillow's truncated / corrupt data
        raise Unreadable(f"truncated or corrupt ({one_line(err, 120)})") from None
    mode = MODES[channels]
    if image.mode != mode:
        report.converted += 1
        if image.mode in ("P", "PA") or image.mode.startswith("I") or image.mode == "F":
            image = image.convert("RGBA" if image.mode in ("P", "PA") else "L")
        image = image.convert(mode)
    if image.size != (size, size):
        report.resized += 1
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    report.read += 1
    return pixels.reshape(size, size, channels)

