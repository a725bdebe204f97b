"""Image decoding (mode_ros.data.images): round trips for every encoding, row padding, errors."""
from __future__ import annotations

import array

import numpy as np
import pytest

from mode_ros.data.images import (
    ImageDecodeError,
    check_image,
    compressed_size,
    decode_compressed,
    decode_image,
    encode_compressed,
    encode_image,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def gray_of(rgb):
    g = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) + 0.5
    return np.repeat(np.clip(g, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "8UC3", "8UC4"])
@pytest.mark.parametrize("pad", [0, 3])
def test_color_round_trip(encoding, pad):
    e = encode_image(RGB, encoding, pad=pad)
    assert e.step >= RGB.shape[1] * (4 if "a" in encoding.lower() or "4" in encoding else 3)
    out = decode_image(e.encoding, e.height, e.width, e.step, e.data)
    assert out.dtype == np.uint8 and out.shape == RGB.shape and out.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1", "mono16", "16UC1"])
@pytest.mark.parametrize("pad", [0, 2])
def test_mono_round_trip(encoding, pad):
    e = encode_image(RGB, encoding, pad=pad)
    out = decode_image(e.encoding, e.height, e.width, e.step, e.data)
    np.testing.assert_array_equal(out, gray_of(RGB))


def test_mono16_big_endian_and_scale():
    e = encode_image(RGB, "mono16", is_bigendian=True)
    out = decode_image("mono16", e.height, e.width, e.step, e.data, is_bigendian=True)
    np.testing.assert_array_equal(out, gray_of(RGB))
    depth = np.array([[0, 1000, 2000, 4000, 9000]], np.uint16)  # mm
    out = decode_image("16UC1", 1, 5, 10, depth.tobytes(), scale16=4000)
    np.testing.assert_array_equal(out[0, :, 0], [0, 64, 128, 255, 255])


def test_payload_types_and_zero_copy():
    e = encode_image(RGB, "rgb8")
    for data in (e.data, bytearray(e.data), memoryview(e.data), np.frombuffer(e.data, np.uint8),
                 array.array("B", e.data)):
        np.testing.assert_array_equal(decode_image("rgb8", 5, 7, 21, data), RGB)
    buf = np.frombuffer(e.data, np.uint8).copy()
    out = decode_image("rgb8", 5, 7, 21, buf)
    assert np.shares_memory(out, buf)  # no copy when nothing to convert
    # longer data than height*step is accepted (trailing bytes ignored)
    np.testing.assert_array_equal(decode_image("rgb8", 5, 7, 21, e.data + b"xyz"), RGB)


@pytest.mark.parametrize("args,reason,text", [
    (("yuv422", 5, 7, 14, b"\0" * 70), "unknown_encoding", "unsupported image encoding 'yuv422'"),
    (("rgb8", 0, 7, 21, b""), "zero_size", "zero size"),
    (("rgb8", 5, 0, 21, b"\0" * 105), "zero_size", "zero size"),
    (("rgb8", 5, 7, 20, b"\0" * 100), "step_too_small", r"step 20 < width\*bytes_per_pixel"),
    (("rgb8", 5, 7, 21, b"\0" * 104), "data_too_short", r"shorter than height\*step = 5\*21 = 105"),
    (("mono16", 2, 3, 7, b"\0" * 14), "step_too_small", "odd"),
])
def test_decode_errors(args, reason, text):
    with pytest.raises(ImageDecodeError, match=text) as ei:
        decode_image(*args)
    assert ei.value.reason == reason and isinstance(ei.value, ValueError)
    if reason != "unknown_encoding" and args[3] > 0:
        with pytest.raises(ImageDecodeError):
            check_image(args[0], args[1], args[2], args[3], len(args[4]))


def test_wrong_dtype_array_rejected():
    with pytest.raises(ImageDecodeError, match="uint8"):
        decode_image("rgb8", 1, 1, 3, np.zeros(3, np.float32))


def test_compressed_png_exact_jpeg_close():
    png = encode_compressed(RGB, "png")
    assert compressed_size("png", png) == (5, 7)
    np.testing.assert_array_equal(decode_compressed("png", png), RGB)
    smooth = np.repeat(np.repeat(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], 16, 0), 3, 2)
    jpg = encode_compressed(smooth, "jpeg", quality=98)
    out = decode_compressed("rgb8; jpeg compressed bgr8", np.frombuffer(jpg, np.uint8))
    assert out.shape == smooth.shape and np.abs(out.astype(int) - smooth).max() <= 4


def test_compressed_16bit_png_and_depth_header():
    from io import BytesIO

    from PIL import Image

    d16 = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    bio = BytesIO()
    Image.fromarray(d16).save(bio, format="PNG")
    out = decode_compressed("16UC1; png compressed", bio.getvalue())
    np.testing.assert_array_equal(out[..., 0], (d16 >> 8).astype(np.uint8))
    # compressedDepth: 12-byte header before the PNG stream
    out2 = decode_compressed("16UC1; compressedDepth png", b"\0" * 12 + bio.getvalue())
    np.testing.assert_array_equal(out, out2)


@pytest.mark.parametrize("payload,text", [
    (b"", "no data"),
    (b"not an image at all", "cannot decode"),
])
def test_compressed_errors(payload, text):
    with pytest.raises(ImageDecodeError, match=text) as ei:
        decode_compressed("jpeg", payload)
    assert ei.value.reason == "corrupt_compressed"
    assert "BytesIO object" not in str(ei.value)


def test_decompression_bomb_is_a_decode_error():
    # a 45-byte PNG whose header claims 20000 x 20000 pixels: PIL raises DecompressionBombError (an
    # Exception, not an OSError), which must not escape the decoder and crash a subscriber callback
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
           + chunk(b"IEND", b""))
    for fn in (compressed_size, decode_compressed):
        with pytest.raises(ImageDecodeError, match="too large") as ei:
            fn("png", png)
        assert ei.value.reason == "too_large"


def test_truncated_jpeg_fails_on_decode():
    big = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpg = encode_compressed(big, "jpeg")
    compressed_size("jpeg", jpg[: len(jpg) // 2])  # header is fine
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        decode_compressed("jpeg", jpg[: len(jpg) // 2])


def test_decode_speed_is_vectorised():
    """640x480 bgr8 with row padding decodes in well under 10 ms (no Python loops)."""
    import time

    img = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    e = encode_image(img, "bgr8", pad=64)
    t = time.perf_counter()
    for _ in range(10):
        out = decode_image(e.encoding, e.height, e.width, e.step, e.data)
    dt = (time.perf_counter() - t) / 10
    np.testing.assert_array_equal(out, img)
    assert dt < 0.01, dt
