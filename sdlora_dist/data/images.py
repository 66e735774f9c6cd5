"""The one image loader: any file PIL reads -> an 8-bit RGB image, used by ``prepare``, training and ``predict``.

``Image.convert("RGB")`` alone is wrong for several modes, so every consumer goes through :func:`to_rgb`:

- ``I;16`` (16-bit greyscale, e.g. a 16-bit PNG): ``round(v / 257)``. This is the PNG specification's sample-depth
  rescaling (W3C PNG, "Sample depth rescaling": ``round(v * (2^8 - 1) / (2^16 - 1))``), the exact inverse of the
  8 -> 16 bit rule ``v * 257``: an 8-bit image saved as 16 bits comes back with identical pixels. PIL's own
  ``convert`` clips instead (every value above 255 becomes white).
- 16-bit colour PNGs never reach this module at 16 bits: PIL's decoder keeps the high byte (``v >> 8``), which
  equals the rule above for 8-bit data saved at 16 bits and is within 1 of it otherwise.
- ``I`` (32-bit signed integers): PIL decodes 16-bit samples (PGM, TIFF) into ``I``, so values within
  ``[0, 65535]`` take the same 16-bit rule; any other range has no defined white point and is stretched linearly
  from its minimum to its maximum (a constant image becomes black).
- ``F`` (32-bit float): assumed in ``[0, 1]`` (the float-image convention of scikit-image and torchvision):
  ``round(clip(v, 0, 1) * 255)``.
- Transparency (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, palette or greyscale images with a
  ``transparency`` entry): composited on a white background, the convention of browsers and image viewers for
  photographs on a page. A transparent pixel therefore becomes white, whatever colour its RGB bytes hold.
- ``CMYK``: PIL's conversion ``R = round((255 - C) * (255 - K) / 255)`` (same for G with M, B with Y), the naive
  device-independent formula; no ICC colour management.
- EXIF orientation: applied first (``ImageOps.exif_transpose``), so a phone photo stored sideways is upright.

Errors: :class:`ImageDecodeError` with a message that names the problem and never a Python object's repr (PIL's
``cannot identify image file <_io.BytesIO object at 0x...>``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # where transparent pixels end up: white
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# modes PIL converts to RGB correctly (no alpha, no range to choose)
_DIRECT_MODES = ("RGB", "L", "1", "P", "CMYK", "YCbCr")
_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """An image that cannot be decoded or converted; the message is one readable phrase."""


def _sixteen_to_8(values: np.ndarray) -> np.ndarray:
    """PNG sample-depth rescaling 16 -> 8 bits: ``round(v * 255 / 65535)`` == ``round(v / 257)``."""
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def _stretch_to_8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _grey_to_8(img: Image.Image) -> np.ndarray:
    """uint8 (H, W) of a ``I;16*``, ``I`` or ``F`` image by the rules in the module docstring."""
    values = np.asarray(img)
    if img.mode == "F":
        return np.rint(np.clip(values.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
    if img.mode in _SIXTEEN_BIT or (values.min() >= 0 and values.max() <= 65535):
        return _sixteen_to_8(values)
    return _stretch_to_8(values)


def has_alpha(img: Image.Image) -> bool:
    """True when ``img`` carries transparency (an alpha band or a ``transparency`` entry)."""
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def _composite(img: Image.Image) -> Image.Image:
    """Alpha-composite on :data:`BACKGROUND`; ``convert("RGBA")`` resolves palettes, ``tRNS``, premultiplied alpha."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """A loaded PIL image of any mode -> 8-bit RGB, upright (EXIF orientation applied); rules in the module doc."""
    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)  # copies; most images have no rotation and skip it
    mode = img.mode
    if mode == "RGB" and not has_alpha(img):
        return img
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_grey_to_8(img), mode="L").convert("RGB")
    if has_alpha(img):
        return _composite(img)
    if mode in _DIRECT_MODES:
        return img.convert("RGB")
    try:  # LAB, HSV, ...: whatever PIL can convert; a mode it cannot is an unreadable image
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageDecodeError(f"image mode {mode} cannot be converted to RGB") from exc


def is_plain(img: Image.Image) -> bool:
    """True when a JPEG/PNG file's bytes need no conversion (RGB or L, no alpha, no EXIF rotation): keep them."""
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    return img.format in ("JPEG", "PNG") and img.mode in ("RGB", "L") and not has_alpha(img) and orientation == 1


def image_error_reason(exc: BaseException) -> str:
    """A readable phrase for a PIL decoding error, without the repr of PIL's file object."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels (decompression-bomb limit)"
    text = str(exc).split(" <_io.", 1)[0]  # PIL names its file object; the caller names the file
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def open_rgb(source: bytes | str | Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode image bytes or a file fully to 8-bit RGB via :func:`to_rgb`; ImageDecodeError when it cannot.

    ``draft`` (width, height, in the file's stored orientation) lets a JPEG decoder skip detail a later downscale
    throws away (DCT scaling, never below that size).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if draft is not None:
                img.draft(None, draft)
            img.load()  # full decode: a truncated file fails here
            return to_rgb(img)
    except ImageDecodeError:
        raise
    except _ERRORS as exc:
        raise ImageDecodeError(image_error_reason(exc)) from exc
