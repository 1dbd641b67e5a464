"""Writing images: `kiln generate` saves a diffusion engine's output as PNG."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from kiln.errors import KilnError


def write_png(path: Path, image: np.ndarray) -> None:
    """Write uint8 `[height, width, 3]` RGB pixels to `path` as PNG, through a temporary file and a rename.

    Pillow writes it when installed. It is not a dependency of torchkiln (a service running engines should not
    need an imaging library for one file format), so without it a minimal writer does: one IDAT chunk of
    zlib-compressed rows, each with filter 0, which every PNG reader takes.
    """
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected uint8 [height, width, 3], got {image.dtype} {list(image.shape)}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        try:
            from PIL import Image
        except ImportError:
            partial.write_bytes(png_bytes(image))
        else:
            Image.fromarray(image, "RGB").save(partial, format="PNG")
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise KilnError(f"{path}: cannot write the image ({error.strerror or error})") from None


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG file of uint8 `[height, width, 3]` RGB pixels, without any imaging library."""
    height, width, _ = image.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits per channel, RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + chunk(b"IEND", b""))
