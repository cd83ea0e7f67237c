"""Image preprocessing, in one place: any image a person has -> uint8 [H, W, 3] RGB at the model's size.

Pillow + numpy only (no torch): used by inference, and by training on an ImageFolder whose images are not
already the model's size, so that both see the same pixels. The rule, for other apps to copy:

1. take the first frame (GIF, multi-page TIFF, MPO) and apply the EXIF orientation;
2. convert to 8-bit RGB: alpha (RGBA, LA, PA, palette or colour-key transparency) is composited on white,
   grayscale and 1-bit are replicated, palette and CMYK go through Pillow's conversion, CIE L*a*b* through
   LittleCMS, 16-bit images keep their top 8 bits (value >> 8). Embedded ICC profiles are not applied:
   pixel values are taken as sRGB, as CIFAR-10's were;
3. resize to the model's H x W with Pillow's antialiased filter (bilinear by default). ``center_crop``
   (the default) takes the largest centred region with the target's aspect ratio; ``squash`` takes the
   whole image. An image already H x W is not resampled: a 32x32 RGB image reaches the model pixel for pixel.

Big JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (never below twice the target size) before the
antialiased resize; images over MAX_PIXELS are refused before they are decoded (decompression bombs).

    from cifarkit.preprocess import load_image, to_pixels
    pixels = load_image("cat.jpg")            # uint8 [32, 32, 3]
    pixels = to_pixels(pil_image_or_array_or_path, (32, 32), "center_crop", "bilinear")
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from cifarkit.errors import first_line
from cifarkit.files import Blob, NotRegularFile, open_regular, read_regular
from cifarkit.spec import IMAGE_SIZE, RESIZE_FILTER, RESIZE_MODE, RESIZE_MODES

try:  # libjpeg-turbo with the GIL released: the JPEG fast path (see "Bytes -> pixels" below)
    import simplejpeg as _simplejpeg
except ImportError:  # an optimization only: without it every image goes through Pillow
    _simplejpeg = None

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported when an image needs it (anything but a JPEG the fast path decodes at the model's size): a
# one-image cifar-infer of a CIFAR JPEG never loads it (~8 ms of a ~0.17 s start).

# Pillow's own bomb limit (its MAX_IMAGE_PIXELS: about 89 megapixels, ~360 MB decoded as RGBA); a larger image is
# refused before it is decoded. Read at call time, so a caller (or a test) can lower it.
MAX_PIXELS = 89_478_485
BIG_IMAGE_PIXELS = 16_000_000  # images decoded at more than this many pixels take _BIG_DECODE, one at a time
_BIG_DECODE = threading.Lock()

_FILTERS = ("bilinear", "bicubic", "nearest", "lanczos", "box")  # Pillow's Image.Resampling, by name

# EXIF orientation (tag 0x0112) -> the transpose that makes the image upright (Pillow's Image.Transpose, by name).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file and the reason."""


def _pil() -> Any:
    """PIL.Image, imported on first use."""
    from PIL import Image

    return Image


def is_pil_image(item: object) -> bool:
    """Whether `item` is a PIL image, without importing Pillow: if it is not imported, nothing is one."""
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(item, module.Image)


# ---------------------------------------------------------------------------------------------------------
# Pixels: orientation, colour, size
# ---------------------------------------------------------------------------------------------------------


def upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation. Unlike ImageOps.exif_transpose, an upright image is returned as is
    rather than copied (a full copy of a 24-megapixel photo costs ~70 MB and ~20 ms)."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block must not cost the image: treat it as upright
        return im
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(getattr(_pil().Transpose, method)) if method is not None else im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        # 16-bit (or 32-bit integer) grayscale: keep the top 8 bits of a 16-bit range.
        arr = np.asarray(im, dtype=np.int64)
        arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return _pil().fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:  # a float image in [0, 1]
            arr = arr * 255.0
        return _pil().fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if im.mode == "LAB":
        # Pillow's convert() would reinterpret L*a*b* as RGB; LittleCMS does the real conversion.
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(im, transform)
    has_alpha = im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "1") and "transparency" in im.info)
    if has_alpha:
        if im.mode == "La":  # premultiplied: Pillow converts La only to LA
            im = im.convert("LA")
        rgba = im.convert("RGBA")
        white = _pil().new("RGBA", rgba.size, (255, 255, 255, 255))
        return _pil().alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def crop_box(width: int, height: int, size: tuple[int, int], mode: str) -> tuple[float, float, float, float]:
    """The source region (left, top, right, bottom) that `mode` maps onto a `size` = (H, W) output."""
    if mode == "squash":
        return (0.0, 0.0, float(width), float(height))
    if mode != "center_crop":
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    th, tw = size
    if width * th > height * tw:  # wider than the target: cut the sides
        cw = height * tw / th
        left = (width - cw) / 2
        return (left, 0.0, left + cw, float(height))
    ch = width * th / tw  # taller (or equal): cut top and bottom
    top = (height - ch) / 2
    return (0.0, top, float(width), top + ch)


def preprocess(
    im: Image.Image,
    size: tuple[int, int] = IMAGE_SIZE,
    mode: str = RESIZE_MODE,
    resample: str = RESIZE_FILTER,
) -> np.ndarray:
    """A decoded Pillow image -> uint8 [H, W, 3] RGB, by the rule in this module's docstring."""
    if resample not in _FILTERS:
        raise ValueError(f"resize filter must be one of {sorted(_FILTERS)}, got {resample!r}")
    im = to_rgb(upright(im))
    th, tw = size
    if im.size != (tw, th):
        box = crop_box(im.width, im.height, size, mode)
        im = im.resize((tw, th), getattr(_pil().Resampling, resample.upper()), box=box)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))  # [H, W, 3]


def load_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] = IMAGE_SIZE,
    mode: str = RESIZE_MODE,
    resample: str = RESIZE_FILTER,
) -> np.ndarray:
    """Open, decode and preprocess one file. Raises ImageError naming the file and the reason.
    The file is read once, whole, and decoded from memory by decode_image (a file over READ_WHOLE_BYTES
    streams through Pillow instead, which reads only what it decodes)."""
    name = os.fspath(path)
    try:
        data = read_regular(name, READ_WHOLE_BYTES)
        if data is None:
            with open_regular(name) as f:
                return _pillow_pixels(f, name, size, mode, resample)
    except _decode_errors() as exc:
        raise _image_error(name, exc) from None
    return decode_image(data, name, size, mode, resample)


def decode_image(
    data: bytes,
    name: str = "<bytes>",
    size: tuple[int, int] = IMAGE_SIZE,
    mode: str = RESIZE_MODE,
    resample: str = RESIZE_FILTER,
) -> np.ndarray:
    """An encoded image (a file's bytes) -> uint8 [H, W, 3] by the rule above. Raises ImageError naming `name`.
    Plain JPEGs take the libjpeg-turbo fast path where its pixels are Pillow's (see _jpeg_header); every other
    image, and every JPEG the fast path leaves, goes through Pillow."""
    if resample not in _FILTERS:
        raise ValueError(f"resize filter must be one of {sorted(_FILTERS)}, got {resample!r}")
    try:
        pixels = _fast_jpeg(data, size, mode, resample)
        return pixels if pixels is not None else _pillow_pixels(io.BytesIO(data), name, size, mode, resample)
    except _decode_errors() as exc:
        raise _image_error(name, exc, len(data)) from None


def _pillow_pixels(fp: Any, name: str, size: tuple[int, int], mode: str, resample: str) -> np.ndarray:
    with _pil().open(fp) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise ImageError(
                f"{name}: refused, {w}x{h} pixels is over the {MAX_PIXELS:,} pixel limit (possible decompression bomb)"
            )
        th, tw = size
        if im.format in ("JPEG", "MPO") and w >= 2 * tw and h >= 2 * th:
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo decodes ~10x faster, and
            # the antialiased resize below still sees at least twice the target's pixels.
            im.draft("RGB", (tw * 2, th * 2))
        # One big decode at a time: memory then stays bounded by one big image plus the small ones, however
        # many decoding threads run (8 threads x 89 megapixels x 4 bytes would be 2.9 GB).
        w, h = im.size  # after draft
        with _BIG_DECODE if w * h > BIG_IMAGE_PIXELS else contextlib.nullcontext():
            im.load()  # Image.open stands on the first frame of a GIF, multi-page TIFF or MPO
            return preprocess(im, size, mode, resample)


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What opening, reading or decoding an image raises (evaluated only when something was raised)."""
    return (OSError, SyntaxError, ValueError, EOFError, MemoryError, _pil().DecompressionBombError)


def _image_error(name: str, exc: BaseException, nbytes: int | None = None) -> ImageError:
    """The ImageError, naming the file and the reason, for an exception from opening, reading or decoding it."""
    if isinstance(exc, ImageError):
        return exc
    if isinstance(exc, NotRegularFile):
        return ImageError(f"{name}: {exc.strerror}")
    image = _pil()
    if isinstance(exc, image.DecompressionBombError):
        return ImageError(f"{name}: refused, possible decompression bomb ({first_line(exc, 160)})")
    if isinstance(exc, FileNotFoundError):
        return ImageError(f"{name}: {'broken symlink' if os.path.islink(name) else 'no such file'}")
    if isinstance(exc, IsADirectoryError):
        return ImageError(f"{name}: is a directory, expected an image file")
    if isinstance(exc, PermissionError):
        return ImageError(f"{name}: permission denied")
    if isinstance(exc, image.UnidentifiedImageError):
        return ImageError(f"{name}: {_unidentified_reason(name, nbytes)}")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return ImageError(f"{name}: symlink loop")
    return ImageError(f"{name}: cannot decode image ({first_line(exc, 160)})")


def _unidentified_reason(path: str, nbytes: int | None = None) -> str:
    if nbytes is None:
        try:
            nbytes = os.path.getsize(path)
        except OSError:
            nbytes = None
    if nbytes == 0:
        return "empty file"
    ext = os.path.splitext(path)[1].lower()
    if ext in (".heic", ".heif"):
        return "HEIC/HEIF is not supported by this Pillow build; convert it to JPEG or PNG"
    return "not an image Pillow can read"


def to_pixels(item: Any, size: tuple[int, int], mode: str, resample: str, source: str | None = None) -> np.ndarray:
    """A path, a Blob or bytes (an encoded file), a PIL image or a uint8 array of any size -> uint8 [H, W, 3]
    at `size`, by the rule above. An array already [H, W, 3] passes through untouched; [H, W], [H, W, 1] and
    [H, W, 4] arrays are images of those modes. Raises ImageError naming `source` (or the path) for anything
    unreadable."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, size, mode, resample)
    if isinstance(item, Blob):
        return decode_image(item.data, item.source, size, mode, resample)
    src = source or "<image>"
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(bytes(item), src, size, mode, resample)
    if isinstance(item, np.ndarray):
        return _array_pixels(item, size, mode, resample, src)
    if is_pil_image(item):
        try:
            return preprocess(item, size, mode, resample)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"{src}: cannot decode image ({first_line(exc)})") from None
    raise TypeError(f"expected a path, a PIL image or a uint8 array, got {type(item).__name__}")


def _array_pixels(a: np.ndarray, size: tuple[int, int], mode: str, resample: str, src: str) -> np.ndarray:
    h, w = size
    if a.dtype != np.uint8:
        raise ImageError(f"{src}: array dtype is {a.dtype}, expected uint8 pixels (0..255)")
    if a.shape == (h, w, 3):
        return np.ascontiguousarray(a)  # already the model's size: passed through untouched
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise ImageError(f"{src}: array shape {list(a.shape)}, expected [H, W], [H, W, 3] or [H, W, 4]")
    return preprocess(_pil().fromarray(np.ascontiguousarray(a)), size, mode, resample)


# ---------------------------------------------------------------------------------------------------------
# Bytes: reading a file once, and the JPEG fast path
# ---------------------------------------------------------------------------------------------------------

# Files up to this size are read whole in one system call and decoded from memory (Pillow reading a CIFAR JPEG
# from a file makes ~38 small reads); a bigger file streams through Pillow, which reads only what it decodes.
READ_WHOLE_BYTES = 64 << 20

# False sends every image through Pillow (what the fast path is compared with). The fast path: Pillow decodes
# JPEGs with libjpeg-turbo too, but parses the markers in Python and holds the GIL for much of the work. Measured
# on this project's 2-core machine, from bytes in memory, a CIFAR JPEG took 114 us in Pillow and 17.5 us in
# simplejpeg (libjpeg-turbo, GIL released while decoding). The fast path takes only what it decodes exactly as
# Pillow does (tests/test_decode.py compares them on every case below and on all 10,000 CIFAR-10 test JPEGs):
# 8-bit, 1 or 3 components, Huffman-coded baseline, extended or progressive, at most one EXIF block (its
# orientation applied as the same pixel moves) and no XMP orientation, decoded at Pillow's draft scale. Any other
# JPEG, and any file that libjpeg-turbo warns about (strict mode), goes to Pillow, which also words the errors.
FAST_JPEG = True

_SOF_FAST = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended sequential, progressive (Huffman)
_SOF_OTHER = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})  # lossless, arithmetic, ...
_EXIF_HEADER = b"Exif\x00\x00"
_XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"

# EXIF orientation -> the numpy view equal to Pillow's transpose (_TRANSPOSE): pixels moved, never resampled.
_NUMPY_TRANSPOSE = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],  # ROTATE_270 (a quarter turn clockwise)
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
    8: lambda a: a.transpose(1, 0, 2)[::-1],  # ROTATE_90 (a quarter turn anticlockwise)
}


def _fast_jpeg(data: bytes, size: tuple[int, int], mode: str, resample: str) -> np.ndarray | None:
    """The pixels of a JPEG the fast path takes, else None (then Pillow decodes it)."""
    if _simplejpeg is None or not FAST_JPEG or not data.startswith(b"\xff\xd8\xff"):
        return None
    header = _jpeg_header(data)
    if header is None:
        return None
    w, h, orientation = header
    if w * h > MAX_PIXELS:
        return None  # Pillow refuses it, with the message
    th, tw = size
    scale = 1
    if w >= 2 * tw and h >= 2 * th:  # Pillow's draft(): the smallest of 1/2, 1/4, 1/8 that keeps twice the target
        ratio = min(w // (2 * tw), h // (2 * th))
        scale = 8 if ratio >= 8 else 4 if ratio >= 4 else 2 if ratio >= 2 else 1
    dw, dh = -(-w // scale), -(-h // scale)  # libjpeg rounds a scaled size up
    with _BIG_DECODE if dw * dh > BIG_IMAGE_PIXELS else contextlib.nullcontext():
        try:
            # min_width/min_height at exactly 1/scale pick that scaling factor: the next smaller one libjpeg-turbo
            # offers is 1/8 below it, at least 8 pixels short on a side of 64 or more.
            arr = _simplejpeg.decode_jpeg(data, "RGB", min_width=dw, min_height=dh)
        except ValueError:  # corrupt, truncated or odd: Pillow decides, and words the error
            return None
        if arr.shape != (dh, dw, 3):
            return None
        transpose = _NUMPY_TRANSPOSE.get(orientation)
        if transpose is not None:
            arr = np.ascontiguousarray(transpose(arr))
        if arr.shape[:2] == (th, tw):
            return arr
        return preprocess(_pil().fromarray(arr), size, mode, resample)


def _jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of a JPEG the fast path may take, read from its markers up to the
    first scan; None when anything is outside the cases known to decode as Pillow does."""
    n, pos = len(data), 2
    found: tuple[int, int] | None = None
    orientation, exif_blocks = 1, 0
    while pos + 4 <= n:
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            return None  # fill bytes, stray markers: rare, and Pillow's to judge
        if marker == 0xDA:  # start of scan: the header is complete
            return (*found, orientation) if found else None
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end <= pos + 3 or end > n:
            return None
        if marker in _SOF_FAST:
            if found or end < pos + 10:
                return None
            precision, h, w, components = struct.unpack_from(">BHHB", data, pos + 4)
            if precision != 8 or components not in (1, 3) or not (w and h):
                return None
            found = (w, h)
        elif marker in _SOF_OTHER:
            return None
        elif marker == 0xE1 and data.startswith(_EXIF_HEADER, pos + 4):
            exif_blocks += 1
            value = _exif_orientation(data[pos + 4 + len(_EXIF_HEADER) : end])
            if exif_blocks > 1 or value is None:
                return None  # Pillow joins several EXIF blocks; leave that to it
            orientation = value
        elif marker == 0xE1 and data.startswith(_XMP_HEADER, pos + 4) and b"Orientation" in data[pos + 4 : end]:
            return None  # Pillow's getexif() reads an XMP orientation when EXIF has none
        pos = end
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag (0x0112) of an EXIF block's first IFD, 1 when absent; None for anything unusual
    (another byte order mark, an IFD out of bounds, the tag twice or not one SHORT): Pillow decides those."""
    if len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if tiff[0] == 0x49 else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    found = None
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind, values = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == _EXIF_ORIENTATION:
            if found is not None or kind != 3 or values != 1:
                return None
            (found,) = struct.unpack_from(order + "H", tiff, entry + 8)
    return 1 if found is None else found
