"""Image preprocessing, in one place: any image a person has -> uint8 [H, W, 3] RGB at the model's size.

Pillow + numpy only (no torch): used by inference, and by training on an ImageFolder whose images are not
already the model's size, so that both see the same pixels. The rule, for other apps to copy:

1. apply the EXIF orientation;
2. convert to 8-bit RGB: alpha is composited on white, grayscale is replicated, palette and CMYK go
   through Pillow's conversion, 16-bit images keep their top 8 bits;
3. resize to the model's H x W with Pillow's antialiased bilinear filter. ``center_crop`` (the default)
   takes the largest centred region with the target's aspect ratio; ``squash`` takes the whole image.
   An image already H x W is left untouched: a 32x32 CIFAR image reaches the model pixel for pixel.

    from cifarkit.preprocess import load_image
    pixels = load_image("cat.jpg")            # uint8 [32, 32, 3]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from cifarkit.spec import IMAGE_SIZE, RESIZE_FILTER, RESIZE_MODE, RESIZE_MODES

# Pillow's own bomb limit (about 89 megapixels); a larger image is refused before it is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

# Extensions we look for in folders (lower-cased before comparison).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)


class ImageError(ValueError):
    """An image that cannot be read or decoded; the message names the file and the reason."""


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: keep the top 8 bits of a 16-bit range.
        arr = np.asarray(im, dtype=np.int64)
        arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L").convert("RGB")
    has_alpha = (
        im.mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (im.mode == "P" and "transparency" in im.info)
        or (im.mode in ("L", "RGB") and "transparency" in im.info)
    )
    if has_alpha:
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
    im = ImageOps.exif_transpose(im)
    th, tw = size
    if im.size != (tw, th):
        box = crop_box(im.width, im.height, size, mode)
        im = to_rgb(im).resize((tw, th), _FILTERS[resample], box=box)
    else:
        im = to_rgb(im)
    arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr)


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
            if im.format == "JPEG" and w >= 2 * tw and h >= 2 * th:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: big photos decode several times faster.
                im.draft("RGB", (tw * 2, th * 2))
            im.seek(0)  # first frame of a GIF / multi-page TIFF
            im.load()
            return preprocess(im, size, mode, resample)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused, possible decompression bomb ({exc})") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory, expected an image file") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except Image.UnidentifiedImageError:
        size_b = _size_or_none(name)
        why = "empty file" if size_b == 0 else "not an image Pillow can read"
        raise ImageError(f"{name}: {why}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: cannot decode image ({_short(exc)})") from None


def _size_or_none(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def stack(images: Sequence[np.ndarray]) -> np.ndarray:
    """A list of uint8 [H, W, 3] -> one contiguous uint8 [N, H, W, 3] batch."""
    return np.ascontiguousarray(np.stack(images)) if images else np.zeros((0, *IMAGE_SIZE, 3), np.uint8)
