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

import errno
import os
from typing import Any

import numpy as np
from PIL import Image

from cifarkit.errors import first_line
from cifarkit.spec import IMAGE_SIZE, RESIZE_FILTER, RESIZE_MODE, RESIZE_MODES

# Pillow's own bomb limit (about 89 megapixels, ~360 MB decoded as RGBA); a larger image is refused before it
# is decoded. Read at call time, so a caller (or a test) can lower it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

# EXIF orientation (tag 0x0112) -> the transpose that makes the image upright.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file and the reason."""


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
    return im.transpose(method) if method is not None else im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT:
        # 16-bit (or 32-bit integer) grayscale: keep the top 8 bits of a 16-bit range.
        arr = np.asarray(im, dtype=np.int64)
        arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:  # a float image in [0, 1]
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L").convert("RGB")
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
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
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
        im = im.resize((tw, th), _FILTERS[resample], box=box)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))  # [H, W, 3]


def load_image(
    path: str | os.PathLike[str],
    size: tuple[int, int] = IMAGE_SIZE,
    mode: str = RESIZE_MODE,
    resample: str = RESIZE_FILTER,
) -> np.ndarray:
    """Open, decode and preprocess one file. Raises ImageError naming the file and the reason."""
    name = os.fspath(path)
    try:
        with Image.open(name) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(
                    f"{name}: refused, {w}x{h} pixels is over the {MAX_PIXELS:,} pixel limit "
                    "(possible decompression bomb)"
                )
            th, tw = size
            if im.format in ("JPEG", "MPO") and w >= 2 * tw and h >= 2 * th:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo decodes ~10x faster, and
                # the antialiased resize below still sees at least twice the target's pixels.
                im.draft("RGB", (tw * 2, th * 2))
            im.load()  # Image.open stands on the first frame of a GIF, multi-page TIFF or MPO
            return preprocess(im, size, mode, resample)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, possible decompression bomb ({first_line(exc, 160)})") from None
    except FileNotFoundError:
        why = "broken symlink" if os.path.islink(name) else "no such file"
        raise ImageError(f"{name}: {why}") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, expected an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: {_unidentified_reason(name)}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(f"{name}: symlink loop") from None
        raise ImageError(f"{name}: cannot decode image ({first_line(exc, 160)})") from None
    except (SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageError(f"{name}: cannot decode image ({first_line(exc, 160)})") from None


def _unidentified_reason(path: str) -> str:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    if size == 0:
        return "empty file"
    ext = os.path.splitext(path)[1].lower()
    if ext in (".heic", ".heif"):
        return "HEIC/HEIF is not supported by this Pillow build; convert it to JPEG or PNG"
    return "not an image Pillow can read"


def to_pixels(item: Any, size: tuple[int, int], mode: str, resample: str, source: str | None = None) -> np.ndarray:
    """A path, a PIL image or a uint8 array of any size -> uint8 [H, W, 3] at `size`, by the rule above.
    An array already [H, W, 3] passes through untouched; [H, W], [H, W, 1] and [H, W, 4] arrays are images
    of those modes. Raises ImageError naming `source` (or the path) for anything unreadable."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(item, size, mode, resample)
    src = source or "<image>"
    if isinstance(item, np.ndarray):
        return _array_pixels(item, size, mode, resample, src)
    if isinstance(item, Image.Image):
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
    return preprocess(Image.fromarray(np.ascontiguousarray(a)), size, mode, resample)
