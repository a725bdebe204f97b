"""ROS-free image conversion: raw ``sensor_msgs/Image`` and ``CompressedImage`` payloads <-> RGB arrays.

Used by the bag converter (``mode_ros.data.bag``) AND the ROS node, so it must be fast: every
conversion is a NumPy view/reshape plus at most one vectorised copy (channel reorder, row-padding
removal); there are no per-pixel Python loops.

Contract: :func:`decode_image` and :func:`decode_compressed` return a C-contiguous ``HxWx3 uint8``
RGB array. When no conversion is needed (``rgb8`` without row padding) the result is a view on
``data`` (read-only when ``data`` is ``bytes``); call ``.copy()`` to own it.
"""
from __future__ import annotations

import io
import re
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ImageDecodeError",
    "EncodedImage",
    "SUPPORTED_ENCODINGS",
    "decode_image",
    "check_image",
    "decode_compressed",
    "compressed_size",
    "encode_image",
    "encode_compressed",
]


class ImageDecodeError(ValueError):
    """An image payload cannot be converted; the message names the problem and ``reason`` is a short
    code for counting (unknown_encoding, zero_size, step_too_small, data_too_short, bad_data,
    corrupt_compressed, too_large)."""

    def __init__(self, message: str, reason: str = "bad_data"):
        super().__init__(message)
        self.reason = reason


# encoding -> (channels, bytes per channel); the key is the lower-cased ROS encoding string
_ENCODINGS: dict[str, tuple[int, int]] = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "8uc1": (1, 1),
    "8uc3": (3, 1),   # OpenCV convention: BGR
    "8uc4": (4, 1),   # OpenCV convention: BGRA
    "mono16": (1, 2),
    "16uc1": (1, 2),
}
SUPPORTED_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3", "8UC4", "mono16", "16UC1")


def _as_uint8(data: Any) -> np.ndarray:
    """A flat uint8 view on any bytes-like payload (bytes, bytearray, memoryview, array.array, ndarray)."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageDecodeError(f"image data must be uint8 bytes, got an array of dtype {data.dtype}")
        return data.reshape(-1)
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        pass
    if isinstance(data, (list, tuple)):
        return np.asarray(data, dtype=np.uint8)
    raise ImageDecodeError(f"image data must be bytes-like, got {type(data).__name__}")


def _scale16(img16: np.ndarray, scale16: float | None) -> np.ndarray:
    """uint16 -> uint8: full range (x*255/65535) by default, or clip to [0, scale16] and stretch."""
    if scale16 is None:
        return (img16 >> 8).astype(np.uint8)
    if scale16 <= 0:
        raise ImageDecodeError(f"scale16 must be > 0, got {scale16}")
    out = np.minimum(img16, scale16).astype(np.float32) * (255.0 / scale16)
    return (out + 0.5).astype(np.uint8)


def _check_raw(encoding: str, height: int, width: int, step: int):
    enc = str(encoding).strip().lower()
    if enc not in _ENCODINGS:
        raise ImageDecodeError(
            f"unsupported image encoding {encoding!r} (supported: {', '.join(SUPPORTED_ENCODINGS)})",
            "unknown_encoding")
    ch, bpc = _ENCODINGS[enc]
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise ImageDecodeError(f"image has zero size ({height}x{width}, encoding {encoding})", "zero_size")
    row_bytes = width * ch * bpc
    if step < row_bytes:
        raise ImageDecodeError(
            f"step {step} < width*bytes_per_pixel = {width}*{ch * bpc} = {row_bytes} (encoding {encoding})",
            "step_too_small")
    if bpc == 2 and step % 2:
        raise ImageDecodeError(f"step {step} is odd for 16-bit encoding {encoding}", "step_too_small")
    return enc, ch, bpc, height, width, step


def check_image(encoding: str, height: int, width: int, step: int, nbytes: int) -> tuple[int, int]:
    """Validate raw Image metadata without touching pixels; returns (height, width) or raises
    :class:`ImageDecodeError` exactly as :func:`decode_image` would."""
    _, _, _, height, width, step = _check_raw(encoding, height, width, step)
    if nbytes < height * step:
        raise ImageDecodeError(
            f"image data has {nbytes} bytes, shorter than height*step = {height}*{step} = {height * step} "
            f"(encoding {encoding}, width {width})", "data_too_short")
    return height, width


def decode_image(encoding: str, height: int, width: int, step: int, data: Any, *,
                 is_bigendian: bool = False, scale16: float | None = None) -> np.ndarray:
    """Convert a raw ``sensor_msgs/Image`` payload to ``HxWx3 uint8`` RGB.

    Supports rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8/8UC1 (replicated to 3 channels),
    8UC3/8UC4 (OpenCV BGR order) and mono16/16UC1 (scaled to 8 bit: ``x >> 8``, or with
    ``scale16=M`` clipped to ``[0, M]`` and stretched, e.g. ``M=4000`` for depth in mm).
    ``step`` (bytes per row, >= width*bytes_per_pixel) is honoured: row padding is removed.
    Raises :class:`ImageDecodeError` naming the problem.
    """
    enc, ch, bpc, height, width, step = _check_raw(encoding, height, width, step)
    buf = _as_uint8(data)
    row_bytes = width * ch * bpc
    need = height * step
    if buf.size < need:
        raise ImageDecodeError(
            f"image data has {buf.size} bytes, shorter than height*step = {height}*{step} = {need} "
            f"(encoding {encoding}, width {width})", "data_too_short")
    rows = buf[:need].reshape(height, step)
    if step != row_bytes:
        rows = rows[:, :row_bytes]
    if bpc == 1:
        px = rows.reshape(height, width, ch)
    else:
        dt = np.dtype(">u2" if is_bigendian else "<u2")
        px16 = np.ascontiguousarray(rows).view(dt).reshape(height, width)
        px = _scale16(px16.astype(np.uint16, copy=False), scale16)[:, :, None]
    if enc in ("rgb8",):
        out = px
    elif enc in ("bgr8", "8uc3"):
        out = px[:, :, ::-1]
    elif enc == "rgba8":
        out = px[:, :, :3]
    elif enc in ("bgra8", "8uc4"):
        out = px[:, :, 2::-1]
    else:  # single channel
        out = np.repeat(px, 3, axis=2)
    return np.ascontiguousarray(out)


def _png_offset(buf: bytes | memoryview) -> int:
    """compressedDepth payloads carry a 12-byte config header before the PNG stream."""
    b = bytes(buf[:64])
    i = b.find(b"\x89PNG")
    return max(i, 0)


def _open_compressed(fmt: str, data: Any):
    from PIL import Image, UnidentifiedImageError

    raw = data if isinstance(data, (bytes, bytearray)) else _as_uint8(data).tobytes()
    if len(raw) == 0:
        raise ImageDecodeError(f"compressed image ({fmt!r}) has no data", "corrupt_compressed")
    off = _png_offset(raw) if "compresseddepth" in str(fmt).lower() else 0
    try:
        return Image.open(io.BytesIO(raw[off:] if off else raw))
    except Image.DecompressionBombError as exc:   # an Exception, not an OSError: would escape
        raise ImageDecodeError(f"compressed image ({fmt!r}, {len(raw)} bytes) is too large to decode: {exc}",
                              "too_large") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise ImageDecodeError(f"cannot decode compressed image (format {fmt!r}, {len(raw)} bytes): {why}",
                              "corrupt_compressed") from None


def compressed_size(fmt: str, data: Any) -> tuple[int, int]:
    """(height, width) of a compressed image from its header only (no pixel decoding)."""
    img = _open_compressed(fmt, data)
    w, h = img.size
    if h <= 0 or w <= 0:
        raise ImageDecodeError(f"compressed image ({fmt!r}) has zero size", "zero_size")
    return h, w


def decode_compressed(format: str, data: Any, *, scale16: float | None = None) -> np.ndarray:  # noqa: A002
    """Decode a ``sensor_msgs/CompressedImage`` payload (JPEG or PNG, incl. 16-bit/compressedDepth
    PNG) to ``HxWx3 uint8`` RGB. The codec is sniffed from the data; ``format`` is used in messages
    and to spot ``compressedDepth``. Truncated or corrupt data raises :class:`ImageDecodeError`."""
    from PIL import Image

    img = _open_compressed(format, data)
    try:
        img.load()
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img)
            if arr.dtype != np.uint16:
                arr = np.clip(arr, 0, 65535).astype(np.uint16)
            return np.ascontiguousarray(np.repeat(_scale16(arr, scale16)[:, :, None], 3, axis=2))
        if mode != "RGB":
            img = img.convert("RGB")
        out = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode compressed image (format {format!r}): {exc}",
                              "corrupt_compressed") from None
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] == 0 or out.shape[1] == 0:
        raise ImageDecodeError(f"compressed image (format {format!r}) decoded to shape {out.shape}",
                              "corrupt_compressed")
    return out


class EncodedImage(NamedTuple):
    """Fields of a ``sensor_msgs/Image`` (``data`` is bytes of length height*step)."""
    encoding: str
    height: int
    width: int
    step: int
    data: bytes


def encode_image(rgb: np.ndarray, encoding: str = "rgb8", *, pad: int = 0,
                 is_bigendian: bool = False) -> EncodedImage:
    """Inverse of :func:`decode_image` for tests and simulators: ``HxWx3 uint8`` RGB -> Image fields.

    ``pad`` extra bytes are appended to every row (step = width*bpp + pad). mono encodings use the
    ITU-R 601 luma; mono16/16UC1 store ``gray * 257`` (so decoding gives the gray value back).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"encode_image expects HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
    enc = encoding.lower()
    h, w, _ = rgb.shape
    if enc == "rgb8":
        px = rgb
    elif enc in ("bgr8", "8uc3"):
        px = rgb[:, :, ::-1]
    elif enc == "rgba8":
        px = np.concatenate([rgb, np.full((h, w, 1), 255, np.uint8)], axis=2)
    elif enc in ("bgra8", "8uc4"):
        px = np.concatenate([rgb[:, :, ::-1], np.full((h, w, 1), 255, np.uint8)], axis=2)
    elif enc in ("mono8", "8uc1", "mono16", "16uc1"):
        gray = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5)
        gray = np.clip(gray, 0, 255).astype(np.uint8)
        if enc in ("mono16", "16uc1"):
            g16 = gray.astype(np.uint16) * 257
            px = g16.astype(">u2" if is_bigendian else "<u2").view(np.uint8).reshape(h, w, 2)
        else:
            px = gray[:, :, None]
    else:
        raise ValueError(f"unsupported encoding {encoding!r} (supported: {', '.join(SUPPORTED_ENCODINGS)})")
    rows = np.ascontiguousarray(px).reshape(h, -1)
    if pad:
        rows = np.concatenate([rows, np.zeros((h, pad), np.uint8)], axis=1)
    return EncodedImage(encoding, h, w, rows.shape[1], rows.tobytes())


def encode_compressed(rgb: np.ndarray, format: str = "jpeg", quality: int = 95) -> bytes:  # noqa: A002
    """``HxWx3 uint8`` RGB -> JPEG or PNG bytes (for tests and simulators)."""
    from PIL import Image

    fmt = format.lower()
    codec = "PNG" if "png" in fmt else "JPEG" if ("jpeg" in fmt or "jpg" in fmt) else None
    if codec is None:
        raise ValueError(f"unsupported compressed format {format!r} (jpeg or png)")
    bio = io.BytesIO()
    kw = {"quality": int(quality)} if codec == "JPEG" else {}
    Image.fromarray(np.ascontiguousarray(rgb)).save(bio, format=codec, **kw)
    return bio.getvalue()
