"""The one preprocessing rule (cifarkit.preprocess): every image kind a person is likely to have -> uint8
[32, 32, 3] RGB, with 32x32 RGB images passed through bit for bit, and every unreadable file an ImageError
that names it."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from cifarkit import preprocess as pp
from cifarkit.preprocess import ImageError, crop_box, load_image, preprocess

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def noise(h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save(im: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    im.save(path, fmt, **kw)
    return path


# ---- passthrough ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kw"),
    [("a.png", {}), ("a.bmp", {}), ("a.tiff", {}), ("a.ppm", {}), ("a.webp", {"lossless": True})],
)
def test_32x32_rgb_passes_through_bit_for_bit(tmp_path, name, kw):
    x = noise()
    out = load_image(save(Image.fromarray(x), tmp_path / name, **kw))
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)
    assert np.array_equal(out, x)


def test_32x32_jpeg_reaches_the_model_as_decoded(tmp_path):
    """JPEG is lossy, so the reference is the decoder's own output: no resampling may touch it."""
    f = save(Image.fromarray(noise()), tmp_path / "a.jpg", quality=90)
    with Image.open(f) as im:
        decoded = np.asarray(im.convert("RGB"))
    assert np.array_equal(load_image(f), decoded)


def test_preprocess_of_an_in_memory_32x32_image_is_identity():
    x = noise(seed=3)
    assert np.array_equal(preprocess(Image.fromarray(x)), x)


# ---- colour modes ------------------------------------------------------------------------------------------


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, :16] = (255, 0, 0, 0)  # fully transparent red: must become white, not red or black
    a[:, 16:] = (0, 0, 255, 255)  # opaque blue
    out = load_image(save(Image.fromarray(a, "RGBA"), tmp_path / "a.png"))
    assert (out[:, :16] == WHITE).all()
    assert (out[:, 16:] == BLUE).all()


def test_half_transparent_rgba_blends_with_white(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[...] = (0, 0, 0, 128)
    out = load_image(save(Image.fromarray(a, "RGBA"), tmp_path / "a.png"))
    assert abs(int(out[0, 0, 0]) - 127) <= 1  # 255 * (1 - 128/255)


def test_la_is_gray_with_alpha_on_white(tmp_path):
    a = np.zeros((32, 32, 2), np.uint8)
    a[:, :16] = (100, 0)
    a[:, 16:] = (100, 255)
    out = load_image(save(Image.fromarray(a, "LA"), tmp_path / "a.png"))
    assert (out[:, :16] == WHITE).all()
    assert (out[:, 16:] == (100, 100, 100)).all()


def test_palette_with_transparency_on_white(tmp_path):
    im = Image.new("P", (32, 32), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    im.paste(1, (16, 0, 32, 32))  # right half: palette entry 1 (red)
    f = save(im, tmp_path / "a.png", transparency=0)  # entry 0 (black) is transparent
    out = load_image(f)
    assert (out[:, :16] == WHITE).all()
    assert (out[:, 16:] == RED).all()


def test_grayscale_is_replicated(tmp_path):
    g = noise()[..., 0]
    out = load_image(save(Image.fromarray(g, "L"), tmp_path / "a.png"))
    assert all(np.array_equal(out[..., c], g) for c in range(3))


def test_one_bit(tmp_path):
    im = Image.new("1", (32, 32), 0)
    im.paste(1, (0, 0, 16, 32))
    out = load_image(save(im, tmp_path / "a.bmp"))
    assert (out[:, :16] == WHITE).all() and (out[:, 16:] == 0).all()


def test_cmyk(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[:, 16:] = (0, 255, 255, 0)  # no cyan, full magenta and yellow: red
    out = load_image(save(Image.fromarray(a, "CMYK"), tmp_path / "a.tiff"))
    assert (out[:, :16] == WHITE).all()
    assert (out[:, 16:] == RED).all()


def test_cmyk_jpeg_decodes(tmp_path):
    f = save(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), tmp_path / "a.jpg", quality=95)
    out = load_image(f)
    assert out.shape == (32, 32, 3) and out.min() > 240  # white, up to JPEG error


def test_sixteen_bit_keeps_the_top_8_bits(tmp_path):
    a = np.full((32, 32), 0x12F0, np.uint16)
    f = save(Image.fromarray(a), tmp_path / "a.png")
    with Image.open(f) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    assert (load_image(f) == 0x12).all()


def test_float_and_lab_and_premultiplied_modes():
    assert (preprocess(Image.new("F", (32, 32), 1.0)) == 255).all()  # a [0, 1] float image
    white_lab = preprocess(Image.new("LAB", (32, 32), (255, 128, 128)))
    assert white_lab.min() >= 250  # L*=100, a*=b*=0 is white (Pillow's plain convert() gives (255, 128, 128))
    assert (preprocess(Image.new("La", (32, 32), (10, 0))) == WHITE).all()


# ---- orientation, frames, formats ------------------------------------------------------------------------


def _half_red_half_blue(w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = RED
    a[:, w // 2 :] = BLUE
    return Image.fromarray(a)


def test_exif_orientation_is_applied(tmp_path):
    im = _half_red_half_blue(64, 32)  # stored landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": red ends up on top
    f = save(im, tmp_path / "a.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(f, mode="squash").astype(int)
    assert out[:8, :, 0].mean() > 200 and out[:8, :, 2].mean() < 50  # top rows red
    assert out[-8:, :, 2].mean() > 200 and out[-8:, :, 0].mean() < 50  # bottom rows blue
    with Image.open(f) as ref:  # and it is exactly what Pillow's own exif_transpose gives
        assert np.array_equal(out, preprocess(ImageOps.exif_transpose(ref), mode="squash"))


def test_damaged_exif_is_ignored(tmp_path):
    f = save(Image.fromarray(noise()), tmp_path / "a.jpg", exif=b"Exif\x00\x00garbage-not-tiff")
    assert load_image(f).shape == (32, 32, 3)


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in (RED, BLUE, GREEN)]
    f = tmp_path / "a.gif"
    frames[0].save(f, save_all=True, append_images=frames[1:], duration=100)
    assert (load_image(f) == RED).all()


def test_multipage_tiff_first_page(tmp_path):
    pages = [Image.new("RGB", (32, 32), c) for c in (GREEN, RED)]
    f = tmp_path / "a.tif"
    pages[0].save(f, save_all=True, append_images=pages[1:])
    assert (load_image(f) == GREEN).all()


def test_lossy_webp(tmp_path):
    out = load_image(save(Image.new("RGB", (50, 40), BLUE), tmp_path / "a.webp", quality=90))
    assert out.shape == (32, 32, 3) and out[..., 2].min() > 230 and out[..., 0].max() < 25


def test_upper_case_extension(tmp_path):
    x = noise(seed=5)
    f = save(Image.fromarray(x), tmp_path / "PHOTO.PNG", "PNG")
    assert np.array_equal(load_image(f), x)
    g = save(Image.fromarray(x), tmp_path / "PHOTO.JPG", "JPEG")
    assert load_image(g).shape == (32, 32, 3)


# ---- resizing ------------------------------------------------------------------------------------------------


def _three_bands(w: int = 64, h: int = 32) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 4] = RED
    a[:, w // 4 : 3 * w // 4] = GREEN
    a[:, 3 * w // 4 :] = BLUE
    return Image.fromarray(a)


def test_center_crop_keeps_the_middle_and_squash_keeps_everything():
    im = _three_bands()  # 64 wide, 32 high: the centre 32x32 is all green
    crop = preprocess(im, mode="center_crop")
    assert (crop == GREEN).all()
    squash = preprocess(im, mode="squash")
    assert (squash[:, 0] == RED).all() and (squash[:, -1] == BLUE).all() and (squash[:, 16] == GREEN).all()


def test_tall_image_is_cropped_top_and_bottom():
    im = _three_bands().transpose(Image.Transpose.ROTATE_90)  # 32 wide, 64 high
    assert (preprocess(im) == GREEN).all()


def test_crop_box():
    assert crop_box(64, 32, (32, 32), "center_crop") == (16.0, 0.0, 48.0, 32.0)
    assert crop_box(32, 64, (32, 32), "center_crop") == (0.0, 16.0, 32.0, 48.0)
    assert crop_box(50, 50, (32, 32), "center_crop") == (0.0, 0.0, 50.0, 50.0)
    assert crop_box(64, 32, (32, 32), "squash") == (0.0, 0.0, 64.0, 32.0)
    with pytest.raises(ValueError, match="resize mode"):
        crop_box(64, 32, (32, 32), "stretch")


def test_other_target_sizes_and_filters():
    out = preprocess(Image.fromarray(noise(100, 80)), size=(24, 40), resample="bicubic")
    assert out.shape == (24, 40, 3)
    with pytest.raises(ValueError, match="resize filter"):
        preprocess(Image.fromarray(noise(100, 80)), resample="sinc")


def test_big_jpeg_uses_reduced_decoding_and_stays_close_to_a_full_decode(tmp_path):
    yy, xx = np.mgrid[0:900, 0:1200]
    smooth = np.stack([xx * 255 // 1200, yy * 255 // 900, (xx + yy) * 255 // 2100], -1).astype(np.uint8)
    f = save(Image.fromarray(smooth), tmp_path / "big.jpg", quality=95)
    out = load_image(f).astype(int)
    with Image.open(f) as im:
        im.load()
        full = preprocess(im).astype(int)  # no draft: full-size decode, then the same resize
    assert out.shape == (32, 32, 3)
    assert np.abs(out - full).mean() < 2.0


# ---- bad files: one ImageError naming the file and the reason -------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.jpg"
    f.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file"):
        load_image(f)


def test_not_an_image(tmp_path):
    f = tmp_path / "notes.png"
    f.write_text("this is text, not a PNG\n" * 10)
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(f)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64)).save(buf, fmt)
    f = tmp_path / f"cut.{fmt.lower()}"
    f.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{fmt.lower()}: cannot decode image"):
        load_image(f)


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a folder, expected a regular file"):
        load_image(tmp_path)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop(tmp_path):
    f = tmp_path / "loop.jpg"
    os.symlink(f.name, f)  # points at itself
    with pytest.raises(ImageError, match=r"loop\.jpg: symlink loop"):
        load_image(f)


def test_decompression_bomb_limit(tmp_path, monkeypatch):
    f = save(Image.fromarray(noise(40, 40)), tmp_path / "a.png")
    monkeypatch.setattr(pp, "MAX_PIXELS", 1000)  # 40x40 = 1,600 pixels
    with pytest.raises(ImageError, match=r"a\.png: refused, 40x40 pixels .*decompression bomb"):
        load_image(f)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_crafted_huge_png_header_is_refused_before_decoding(tmp_path):
    f = tmp_path / "bomb.png"
    f.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels claimed in 60 bytes
    with pytest.raises(ImageError, match=r"bomb\.png: refused.*decompression bomb"):
        load_image(f)
