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
    "compressed_header",
    "compressed_codec",
    "pixel_limit",
    "MAX_PIXELS",
    "encode_image",
    "encode_compressed",
]


class ImageDecodeError(ValueError):
    """An image payload cannot be converted; the message names the problem and ``reason`` is a short
    code for counting (unknown_encoding, zero_size, step_too_small, data_too_short, bad_data,
    corrupt_compressed, unsupported_format, truncated, too_large)."""

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


def check_image(encoding: str, height: int, width: int, step: int, nbytes: int, *,
                max_pixels: int | None = None) -> tuple[int, int]:
    """Validate raw Image metadata without touching pixels; returns (height, width) or raises
    :class:`ImageDecodeError` exactly as :func:`decode_image` would."""
    _, _, _, height, width, step = _check_raw(encoding, height, width, step)
    _check_pixels(height, width, max_pixels, f"image ({encoding})")
    if nbytes < height * step:
        raise ImageDecodeError(
            f"image data has {nbytes} bytes, shorter than height*step = {height}*{step} = {height * step} "
            f"(encoding {encoding}, width {width})", "data_too_short")
    return height, width


def decode_image(encoding: str, height: int, width: int, step: int, data: Any, *,
                 is_bigendian: bool = False, scale16: float | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
    """Convert a raw ``sensor_msgs/Image`` payload to ``HxWx3 uint8`` RGB.

    Supports rgb8, bgr8, rgba8, bgra8 (alpha dropped), mono8/8UC1 (replicated to 3 channels),
    8UC3/8UC4 (OpenCV BGR order) and mono16/16UC1 (scaled to 8 bit: ``x >> 8``, or with
    ``scale16=M`` clipped to ``[0, M]`` and stretched, e.g. ``M=4000`` for depth in mm).
    ``step`` (bytes per row, >= width*bytes_per_pixel) is honoured: row padding is removed. More than
    ``max_pixels`` (default :data:`MAX_PIXELS`) is refused (too_large).
    Raises :class:`ImageDecodeError` naming the problem.
    """
    enc, ch, bpc, height, width, step = _check_raw(encoding, height, width, step)
    _check_pixels(height, width, max_pixels, f"image ({encoding})")
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


#: Largest image (pixels) decoded when the caller gives no limit: 8192 x 4096 (a 4K camera is 8.3 M).
MAX_PIXELS = 8192 * 4096
#: An auto limit is this many times the model's input image, and at least MIN_AUTO_PIXELS.
AUTO_PIXELS_FACTOR = 64
MIN_AUTO_PIXELS = 1920 * 1200


def pixel_limit(image_size: tuple[int, int] | None, max_pixels: int = 0) -> int:
    """The decode limit in pixels: ``max_pixels`` when > 0, else derived from the model's input size
    ``(H, W)``: AUTO_PIXELS_FACTOR x H x W, at least MIN_AUTO_PIXELS (1920 x 1200), or MAX_PIXELS
    without a size."""
    if max_pixels > 0:
        return int(max_pixels)
    if not image_size:
        return MAX_PIXELS
    h, w = (int(v) for v in image_size)
    return max(AUTO_PIXELS_FACTOR * h * w, MIN_AUTO_PIXELS)


def _check_pixels(height: int, width: int, max_pixels: int | None, what: str) -> None:
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if height * width > limit:
        raise ImageDecodeError(f"{what} declares {width}x{height} = {height * width} pixels, above the limit of "
                               f"{limit} (image too large to decode)", "too_large")


def _png_offset(buf: bytes | memoryview) -> int:
    """compressedDepth payloads carry a 12-byte config header before the PNG stream."""
    b = bytes(buf[:64])
    i = b.find(b"\x89PNG")
    return max(i, 0)


def compressed_codec(fmt: str) -> str | None:
    """The codec a ``CompressedImage.format`` names: "PNG", "JPEG", or None for an empty format (then
    the data may be either); any other format raises ``ImageDecodeError`` (unsupported_format)."""
    f = str(fmt).lower()
    if "png" in f:
        return "PNG"
    if "jpeg" in f or "jpg" in f:
        return "JPEG"
    if not f.strip():
        return None
    raise ImageDecodeError(f"compressed image format {fmt!r} is not supported (jpeg or png)", "unsupported_format")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


_SOF_HUFFMAN = {0xC0: 2, 0xC1: 2, 0xC2: 1}   # SOF marker -> least bits one 8x8 block can be coded in


def _jpeg_header(raw: bytes) -> tuple[int, int, int]:
    """(height, width, least entropy-coded bytes the declared size needs) from the JPEG markers, without
    decoding. Each 8x8 block of a Huffman-coded JPEG takes at least one code (DC; sequential: DC and
    EOB/AC), so a header claiming more blocks than the scan data can hold is detected here."""
    n, i, sof = len(raw), 2, None
    while i + 4 <= n:
        if raw[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = raw[i + 1]
        if marker == 0xFF:           # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:   # markers without a length
            i += 2
            continue
        seglen = int.from_bytes(raw[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            seg = raw[i + 4:i + 2 + seglen]
            if len(seg) < 6:
                raise ValueError("short SOF segment")
            h, w, nc = int.from_bytes(seg[1:3], "big"), int.from_bytes(seg[3:5], "big"), seg[5]
            comps = [(seg[7 + 3 * k] >> 4, seg[7 + 3 * k] & 15) for k in range(nc) if 8 + 3 * k < len(seg)]
            sof = (marker, h, w, comps)
        elif marker == 0xDA:         # start of scan: entropy-coded data follows the segment
            if sof is None:
                raise ValueError("scan before the frame header (SOF)")
            marker, h, w, comps = sof
            bits = _SOF_HUFFMAN.get(marker, 0)
            hmax = max((c[0] for c in comps), default=1) or 1
            vmax = max((c[1] for c in comps), default=1) or 1
            blocks = sum(_ceil(_ceil(w * hs, hmax), 8) * _ceil(_ceil(h * vs, vmax), 8) for hs, vs in comps)
            return h, w, blocks * bits // 8
        i += 2 + seglen
    raise ValueError("no frame header and scan (SOF/SOS) before the end of the data")


def compressed_header(fmt: str, data: Any, max_pixels: int | None = None) -> tuple[str, int, int]:
    """(codec, height, width) of a CompressedImage from its header bytes only (PNG IHDR or JPEG SOF):
    nothing is decoded or allocated, so a bomb header costs microseconds. Raises
    :class:`ImageDecodeError`: unsupported_format, corrupt_compressed, zero_size, too_large (more than
    ``max_pixels``, default :data:`MAX_PIXELS`), truncated (a JPEG declaring more blocks than its data
    can code)."""
    codec = compressed_codec(fmt)
    raw = data if isinstance(data, (bytes, bytearray)) else _as_uint8(data).tobytes()
    if len(raw) == 0:
        raise ImageDecodeError(f"compressed image ({fmt!r}) has no data", "corrupt_compressed")
    raw = raw[_png_offset(raw):] if "compresseddepth" in str(fmt).lower() else raw
    is_png, is_jpeg = raw[:8] == b"\x89PNG\r\n\x1a\n", raw[:2] == b"\xff\xd8"
    if (codec or ("PNG" if is_png else "JPEG")) == "PNG":
        if not is_png or len(raw) < 24 or raw[12:16] != b"IHDR":
            raise ImageDecodeError(f"cannot decode compressed image (format {fmt!r}, {len(raw)} bytes): "
                                   "not PNG data (no PNG signature and IHDR)", "corrupt_compressed")
        w, h = int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
        codec = "PNG"
    else:
        try:
            if not is_jpeg:
                raise ValueError("no JPEG start-of-image marker")
            h, w, need = _jpeg_header(raw)
        except (ValueError, IndexError) as exc:
            raise ImageDecodeError(f"cannot decode compressed image (format {fmt!r}, {len(raw)} bytes): not "
                                   f"JPEG data ({exc})", "corrupt_compressed") from None
        _check_pixels(h, w, max_pixels, f"compressed image ({fmt!r})")
        if len(raw) < need:
            raise ImageDecodeError(f"compressed image (format {fmt!r}) declares {w}x{h} pixels but its {len(raw)} "
                                   f"bytes cannot code them (at least {need} needed): truncated", "truncated")
        codec = "JPEG"
    if h <= 0 or w <= 0:
        raise ImageDecodeError(f"compressed image ({fmt!r}) has zero size", "zero_size")
    _check_pixels(h, w, max_pixels, f"compressed image ({fmt!r})")
    return codec, h, w


def compressed_size(fmt: str, data: Any, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of a compressed image from its header only (no pixel decoding); a size above
    ``max_pixels`` (default :data:`MAX_PIXELS`) raises ``ImageDecodeError`` (too_large)."""
    _, h, w = compressed_header(fmt, data, max_pixels)
    return h, w


def _open_compressed(fmt: str, data: Any, max_pixels: int | None):
    from PIL import Image, ImageFile

    raw = data if isinstance(data, (bytes, bytearray)) else _as_uint8(data).tobytes()
    codec, h, w = compressed_header(fmt, raw, max_pixels)
    off = _png_offset(raw) if "compresseddepth" in str(fmt).lower() else 0
    ImageFile.LOAD_TRUNCATED_IMAGES = False   # a truncated image raises; it is never padded with grey
    try:
        img = Image.open(io.BytesIO(raw[off:] if off else raw), formats=(codec,))
    except Image.DecompressionBombError as exc:   # an Exception, not an OSError: would escape
        raise ImageDecodeError(f"compressed image ({fmt!r}, {len(raw)} bytes) is too large to decode: {exc}",
                              "too_large") from None
    except (OSError, ValueError) as exc:
        why = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise ImageDecodeError(f"cannot decode compressed image (format {fmt!r}, {len(raw)} bytes): {why}",
                              "corrupt_compressed") from None
    return img, (h, w)


def decode_compressed(format: str, data: Any, *, scale16: float | None = None,  # noqa: A002
                      max_pixels: int | None = None) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` payload (JPEG or PNG, incl. 16-bit/compressedDepth
    PNG) to ``HxWx3 uint8`` RGB. Only the codec ``format`` names is decoded (an empty format: JPEG or
    PNG by the data); the declared size is checked against ``max_pixels`` (default :data:`MAX_PIXELS`)
    from the header before anything is decoded. Truncated or corrupt data raises
    :class:`ImageDecodeError` (reasons unsupported_format, too_large, truncated, corrupt_compressed)."""
    from PIL import Image

    img, (h, w) = _open_compressed(format, data, max_pixels)
    try:
        img.load()
        mode = img.mode
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img)
            if arr.dtype != np.uint16:
                arr = np.clip(arr, 0, 65535).astype(np.uint16)
            out = np.ascontiguousarray(np.repeat(_scale16(arr, scale16)[:, :, None], 3, axis=2))
        else:
            out = np.asarray(img if mode == "RGB" else img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt_compressed"
        raise ImageDecodeError(f"cannot decode compressed image (format {format!r}): {exc}", reason) from None
    if out.shape != (h, w, 3):
        raise ImageDecodeError(f"compressed image (format {format!r}) decoded to shape {out.shape}, its header "
                              f"declares {h}x{w}", "corrupt_compressed")
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
