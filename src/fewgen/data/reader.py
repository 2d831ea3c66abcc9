"""The one image file reader: every file fewgen reads (dataset folders, Omniglot zips, novel
folders, ``fewgen fit`` shots, ``fewgen predict`` inputs, fewgen's own synthetic PNGs) goes
through :func:`read_image_array`, which returns uint8 (C, H, W) at the file's own size.

How a file becomes 8-bit gray (``C = 1``) or RGB (``C = 3``):

* the EXIF orientation is applied (a phone photo taken upright is read upright);
* 8-bit files without alpha (``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``) are converted by
  PIL (``L`` is the luminance ``0.299 R + 0.587 G + 0.114 B``; gray -> RGB repeats the channel);
* alpha (``RGBA``, ``LA``, ``PA``, a palette or gray image with a transparent colour) is
  composited on black, ``round(value * alpha / 255)``: opaque pixels keep their value, and
  transparent ones are black, as the strokes of the stroke datasets' drawings lie on black;
* 16-bit gray (``I;16``, ``I;16B``, ``I;16L``, and ``I`` read from a 16-bit PNG) is brought to
  8 bits by ``round(v / 257)`` (65535 -> 255); PIL reads 16-bit RGB(A) PNGs as 8-bit itself
  (the high byte, within 1 of the same rounding). A 32-bit integer image (``I`` from another
  format) is read as 8-bit when its values lie in [0, 255], as 16-bit when they lie in
  [0, 65535], and refused otherwise;
* floating-point images (``F``, e.g. a float TIFF) with every value in [0, 1] are scaled by 255,
  with every value in [0, 255] are rounded as they are; any other range (or NaN) is refused.

An image whose header declares more than :data:`MAX_PIXELS` pixels is refused before anything is
decoded; PIL's own decompression-bomb guard gives the same refusal. Every refusal is one
:class:`~fewgen.errors.FewgenError` line naming the file and the fix.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from pathlib import Path

import numpy as np

from fewgen.errors import FewgenError

#: the most pixels (width x height) an image file may declare: a 10000 x 10000 photo is the limit
MAX_PIXELS = 100_000_000

#: what PIL raises on a damaged or hostile file (its decoders are not uniform about it)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                  struct.error)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_WITH_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")
# PIL's guard (Image.MAX_IMAGE_PIXELS) refuses while opening, before the size can be read; it is
# lifted for the header read alone (nothing is decoded then) so that fewgen's limit, with the
# declared size, is the one that applies. The lock keeps two readers from restoring each other's.
_HEADER_LOCK = threading.Lock()


def too_large(where: str, width: int | None, height: int | None, pixels: int | None = None) -> str:
    size = f"{width}x{height} = {width * height:,}" if width and height else f"{pixels:,}" if pixels else "too many"
    return (f"image {where} declares {size} pixels, over fewgen's limit of {MAX_PIXELS:,} "
            f"(fewgen.data.reader.MAX_PIXELS); resize it (at most {int(MAX_PIXELS ** 0.5)} px a side) "
            "or remove it and rerun")


def _bomb(where: str, error: BaseException) -> FewgenError:
    found = re.search(r"\((\d+) pixels\)", str(error))
    return FewgenError(too_large(where, None, None, int(found.group(1)) if found else None))


def _open(source: bytes | str | Path, where: str):
    """The image with its header read, refused when it declares more than :data:`MAX_PIXELS`."""
    from PIL import Image

    with _HEADER_LOCK:
        pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        finally:
            Image.MAX_IMAGE_PIXELS = pil_limit
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise FewgenError(too_large(where, width, height))
    return img


def _integer_to_uint8(arr: np.ndarray, sixteen_bit: bool, where: str) -> np.ndarray:
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise FewgenError(f"image {where} has 32-bit integer pixels from {lo} to {hi}; fewgen reads 8- and 16-bit "
                          "images: save it as an 8-bit or 16-bit PNG")
    if not sixteen_bit and hi <= 255:
        return arr.astype(np.uint8)
    return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255


def _float_to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    finite = bool(np.isfinite(arr).all())
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size and finite else (0.0, 0.0)
    if not finite or lo < 0 or hi > 255:
        what = "NaN or infinite values" if not finite else f"values from {lo:g} to {hi:g}"
        raise FewgenError(f"image {where} is a floating-point image with {what}; fewgen reads float images "
                          "in [0, 1] or [0, 255]: rescale it to one of these ranges or save it as an 8-bit PNG")
    scale = 255.0 if hi <= 1 else 1.0
    return np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def _composite_on_black(img):
    """An image with alpha -> ``L`` or ``RGB``, each value times alpha / 255 (rounded)."""
    from PIL import Image

    gray = img.mode in ("LA", "La") or (img.mode in ("L", "1") and "transparency" in img.info)
    arr = np.asarray(img.convert("LA" if gray else "RGBA"), dtype=np.uint16)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    out = ((colour * alpha + 127) // 255).astype(np.uint8)
    return Image.fromarray(out[..., 0] if gray else out, "L" if gray else "RGB")


def _upright(img) -> None:
    """Apply the EXIF orientation in place; a damaged EXIF block leaves the pixels as stored (they
    are intact, only their orientation is unknown)."""
    from PIL import ImageOps

    try:
        ImageOps.exif_transpose(img, in_place=True)
    except _DECODE_ERRORS:
        pass


def _to_mode(img, mode: str, where: str):
    """A loaded PIL image as an 8-bit ``L`` or ``RGB`` image (the rules in the module docstring)."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        sixteen = img.mode in _SIXTEEN_BIT or img.format == "PNG"
        img = Image.fromarray(_integer_to_uint8(np.asarray(img), sixteen, where), "L")
    elif img.mode == "F":
        img = Image.fromarray(_float_to_uint8(np.asarray(img), where), "L")
    elif img.mode in _WITH_ALPHA or (img.mode in ("P", "L", "1", "RGB") and "transparency" in img.info):
        img = _composite_on_black(img)
    return img if img.mode == mode else img.convert(mode)


def read_image_array(source: bytes | str | Path, channels: int, where: str | None = None) -> np.ndarray:
    """One image file (a path or its bytes) as uint8 (C, H, W) at its own size, C = ``channels``
    (1: gray, 3: RGB), read by the rules in the module docstring.

    Args:
        source: a file path, or the file's bytes (an entry of a zip).
        channels: 1 or 3.
        where: how the file is named in errors (the path when not given).

    A file that cannot be read, or declares too many pixels, or has pixel values fewgen cannot
    map to 8 bits, is a :class:`FewgenError` naming it."""
    from PIL import Image

    if channels not in (1, 3):
        raise FewgenError(f"images are read as 1 (gray) or 3 (RGB) channels, not {channels}")
    where = where if where is not None else str(source) if not isinstance(source, bytes) else "<bytes>"
    try:
        with _open(source, where) as img, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            _upright(img)
            arr = np.array(_to_mode(img, "L" if channels == 1 else "RGB", where), dtype=np.uint8)  # writable
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(where, e) from None
    except _DECODE_ERRORS as e:
        raise FewgenError(f"cannot read image {where} ({e}); remove or replace that file and rerun") from None
    return np.ascontiguousarray(arr[None] if channels == 1 else arr.transpose(2, 0, 1))


__all__ = ["MAX_PIXELS", "read_image_array"]
