"""The bytes entry point and the JPEG fast path (cifarkit.preprocess.decode_image): where the fast path decodes,
its pixels must equal Pillow's exactly (the one preprocessing rule); everything else goes through Pillow,
with the same error messages. Checked on every odd case below and, with CIFARKIT_DATA, on all 10,000 CIFAR-10
test JPEGs."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit import preprocess as pp
from cifarkit.files import Blob, NotRegularFile, read_regular
from cifarkit.preprocess import ImageError, decode_image, load_image, to_pixels
from conftest import REAL_DATA, needs_real_data


def pillow_only(data: bytes, name: str = "x", **kw) -> np.ndarray:
    """The reference: the same rule with the fast path switched off."""
    old = pp.FAST_JPEG
    pp.FAST_JPEG = False
    try:
        return decode_image(data, name, **kw)
    finally:
        pp.FAST_JPEG = old


def fast_taken(data: bytes, size=(32, 32)) -> bool:
    return pp._fast_jpeg(data, size, "center_crop", "bilinear") is not None


def jpeg(arr: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: compresses like a photo, exercises every DCT coefficient."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx + yy) * 255 // max(h + w, 1)], -1)
    noise = np.random.default_rng(seed).normal(0, 25, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# ---- the fast path equals Pillow ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (20, 17), (33, 31), (64, 64), (100, 60), (480, 640), (777, 1001)])
@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0
def test_sizes_and_subsampling_equal_pillow(size, subsampling):
    data = jpeg(photo(*size, seed=size[0]), quality=85, subsampling=subsampling)
    assert fast_taken(data)
    assert np.array_equal(decode_image(data), pillow_only(data))


@pytest.mark.parametrize(("size", "scale"), [((128, 128), 2), ((300, 260), 4), ((900, 1200), 8), ((64, 5000), 1)])
def test_draft_scales_equal_pillow(size, scale):
    """Big JPEGs: Pillow decodes at 1/2, 1/4 or 1/8 (draft); the fast path must pick the same scale."""
    data = jpeg(photo(*size), quality=90)
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (64, 64))
        assert im.size[0] == -(-size[1] // scale)  # the scale this case is meant to exercise
    assert fast_taken(data)
    for mode in ("center_crop", "squash"):
        assert np.array_equal(decode_image(data, mode=mode), pillow_only(data, mode=mode))
    assert np.array_equal(decode_image(data, size=(24, 40)), pillow_only(data, size=(24, 40)))


@pytest.mark.parametrize(
    "kw",
    [
        {"progressive": True},
        {"progressive": True, "subsampling": 2},
        {"restart_marker_blocks": 1},
        {"restart_marker_rows": 2},
        {"optimize": True},
        {"quality": 100, "subsampling": 0},
        {"quality": 5},
    ],
)
def test_encodings_equal_pillow(kw):
    data = jpeg(photo(90, 70, seed=3), **kw)
    assert fast_taken(data)
    assert np.array_equal(decode_image(data), pillow_only(data))


@pytest.mark.parametrize("size", [(32, 32), (200, 150)])
def test_grayscale_equals_pillow(size):
    data = jpeg(photo(*size), mode="L", quality=90)
    assert fast_taken(data)
    out = decode_image(data)
    assert np.array_equal(out, pillow_only(data))
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("size", [(32, 32), (24, 40), (300, 200)])
def test_exif_orientations_equal_pillow(orientation, size):
    data = jpeg(photo(*size, seed=orientation), quality=92, exif=_exif(orientation))
    assert fast_taken(data)
    for mode in ("center_crop", "squash"):
        assert np.array_equal(decode_image(data, mode=mode), pillow_only(data, mode=mode))


def test_big_endian_exif_and_other_tags():
    # A hand-made big-endian TIFF block: ImageWidth (a LONG) before Orientation 6 (a SHORT).
    ifd = struct.pack(">H", 2) + struct.pack(">HHII", 0x0100, 4, 1, 40) + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0)
    tiff = b"MM\x00*" + struct.pack(">I", 8) + ifd + b"\x00\x00\x00\x00"
    data = jpeg(photo(40, 30), quality=90, exif=b"Exif\x00\x00" + tiff)
    assert pp._jpeg_header(data)[2] == 6
    assert np.array_equal(decode_image(data, mode="squash"), pillow_only(data, mode="squash"))


# ---- what the fast path leaves to Pillow -------------------------------------------------------------------


def _cmyk() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 50, 200, 10)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _two_exif_blocks() -> bytes:
    data = jpeg(photo(32, 32), quality=90, exif=_exif(3))
    body = b"Exif\x00\x00" + _exif(6)[6:]
    return data[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(body)) + body + data[2:]


def _xmp_orientation() -> bytes:
    xmp = b'http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    data = jpeg(photo(48, 32), quality=90)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", 2 + len(xmp)) + xmp + data[2:]


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("cmyk", _cmyk),
        ("two EXIF blocks", _two_exif_blocks),
        ("XMP orientation", _xmp_orientation),
        ("damaged EXIF", lambda: jpeg(photo(32, 32), exif=b"Exif\x00\x00garbage-not-tiff")),
        ("EXIF orientation as a LONG", lambda: jpeg(photo(32, 32), exif=b"Exif\x00\x00" + _long_orientation())),
        ("fill bytes before a marker", lambda: _with_fill_bytes(jpeg(photo(32, 32)))),
    ],
)
def test_odd_jpegs_go_to_pillow_and_decode_as_before(name, make):
    data = make()
    assert not fast_taken(data), name
    assert np.array_equal(decode_image(data), pillow_only(data))


def _long_orientation() -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 4, 1, 6)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"


def _with_fill_bytes(data: bytes) -> bytes:
    return data[:2] + b"\xff\xff" + data[2:]


def test_xmp_orientation_is_applied_as_pillow_does():
    data = _xmp_orientation()
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == 6  # Pillow reads it: the fast path must not ignore it
    assert decode_image(data, mode="squash").shape == (32, 32, 3)


def test_load_image_reads_the_file_once_and_takes_the_fast_path(tmp_path, monkeypatch):
    calls = []
    real = pp._simplejpeg.decode_jpeg
    monkeypatch.setattr(pp._simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or real(*a, **k))
    f = tmp_path / "a.jpg"
    f.write_bytes(jpeg(photo(32, 32)))
    assert np.array_equal(load_image(f), pillow_only(f.read_bytes()))
    assert calls == [1]


def test_without_simplejpeg_everything_goes_through_pillow(monkeypatch):
    monkeypatch.setattr(pp, "_simplejpeg", None)
    data = jpeg(photo(50, 40))
    assert not fast_taken(data)
    assert np.array_equal(decode_image(data), pillow_only(data))


# ---- bytes in: errors name the source ------------------------------------------------------------------------


def test_bytes_errors_name_the_source():
    with pytest.raises(ImageError, match=r"^x\.jpg: empty file$"):
        decode_image(b"", "x.jpg")
    with pytest.raises(ImageError, match=r"^y\.png: not an image Pillow can read$"):
        decode_image(b"hello, not an image" * 10, "y.png")
    data = jpeg(photo(64, 64))
    with pytest.raises(ImageError, match=r"^cut\.jpg: cannot decode image"):
        decode_image(data[: len(data) // 2], "cut.jpg")


def test_to_pixels_takes_bytes_and_blobs():
    data = jpeg(photo(40, 50))
    want = pillow_only(data)
    assert np.array_equal(to_pixels(data, (32, 32), "center_crop", "bilinear"), want)
    assert np.array_equal(to_pixels(Blob("s3://b/a.jpg", data), (32, 32), "center_crop", "bilinear"), want)
    with pytest.raises(ImageError, match=r"^s3://b/bad\.jpg: not an image"):
        to_pixels(Blob("s3://b/bad.jpg", b"nope" * 20), (32, 32), "center_crop", "bilinear")


def test_read_regular(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    assert read_regular(f) == b"x" * 1000
    assert read_regular(f, limit=999) is None  # too big to hold: the caller streams it through Pillow
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFile, match="FIFO"):  # refused at once, never blocks waiting for a writer
        read_regular(fifo)
    with pytest.raises(ImageError, match=r"pipe\.jpg: is a FIFO"):
        load_image(fifo)


def test_a_file_over_the_read_limit_streams_through_pillow(tmp_path, monkeypatch):
    f = tmp_path / "big.jpg"
    f.write_bytes(jpeg(photo(300, 200)))
    want = load_image(f)
    monkeypatch.setattr(pp, "READ_WHOLE_BYTES", 100)
    assert np.array_equal(load_image(f), want)


# ---- all 10,000 real test JPEGs ---------------------------------------------------------------------------


@needs_real_data
def test_every_real_test_jpeg_equals_pillow():
    files = sorted(Path(REAL_DATA, "test").glob("*/*.jpg"))
    assert len(files) == 10_000
    differ = []
    for f in files:
        data = f.read_bytes()
        assert fast_taken(data), f
        if not np.array_equal(decode_image(data, str(f)), pillow_only(data, str(f))):
            differ.append(f.name)
    assert differ == []
