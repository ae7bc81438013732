"""Image loading for DeepSeek-VL2 conversations.

`load_pil_images` is the model card helper: it opens every message's "images" entry, in order, exactly like the
official `PIL.Image.open(path).convert("RGB")` (no EXIF rotation, alpha dropped without compositing), so processor
outputs match the official ones. `load_image` is the general entry point behind it: paths, file:// URIs, http(s)
URLs, base64 data URLs, raw bytes, PIL images and numpy arrays, with clear errors instead of Pillow internals.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_BYTES", "ImageLoadError", "ImageNotFoundError", "ImageSource", "load_image", "load_pil_images"]

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Cap on downloaded / decoded encoded bytes (URLs, data URLs), so a wrong link cannot exhaust memory."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageLoadError(ValueError):
    """An image source could not be turned into an RGB PIL image; the message names the source and the fix."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image file does not exist (also a FileNotFoundError, so generic handlers keep working)."""


def load_image(
    source: ImageSource,
    *,
    exif_transpose: bool = False,
    timeout: float = 10.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int | None = None,
) -> Image.Image:
    """Load one image as an RGB PIL image.

    Args:
        source: a file path (str or PathLike), a `file://` URI, an `http(s)://` URL, a `data:image/...;base64,`
            URL, raw encoded bytes, a PIL image, or a numpy array (HxW, HxWx1, HxWx3, HxWx4; uint8, uint16, or
            float in [0, 1]).
        exif_transpose: rotate according to the EXIF orientation tag. Off by default because the official
            pipeline does not do it and the goldens (and the model's training data handling) assume raw pixels.
        timeout: seconds for each network operation of an http(s) download.
        max_bytes: largest accepted download / data URL payload.
        max_pixels: largest accepted width * height. None keeps only Pillow's own decompression bomb guard
            (`PIL.Image.MAX_IMAGE_PIXELS`: a warning above it, an error above twice it), which applies in any case.

    Modes convert like `Image.convert("RGB")` (alpha is dropped without compositing, palettes are expanded, L is
    replicated) except 16-bit grayscale ("I;16*" modes, uint16 arrays): `convert` would clip every value above 255
    to white, so these are scaled to 8 bits first with round(v / 257). 32-bit "I" and float "F" images keep
    `convert`'s semantics (values taken as 0..255 and clipped).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, "PIL image", exif_transpose, max_pixels)
    if isinstance(source, np.ndarray):
        return _to_rgb(_array_to_image(source), "numpy array", exif_transpose, max_pixels)
    if isinstance(source, (bytes, bytearray)):
        return _decode(io.BytesIO(source), f"{len(source)} bytes of image data", exif_transpose, max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise ImageLoadError(
            f"Cannot load an image from a {type(source).__name__}; pass a file path, URL, data URL, bytes, "
            "PIL image or numpy array."
        )

    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https"):
        data = _download(text, timeout, max_bytes)
        return _decode(io.BytesIO(data), text, exif_transpose, max_pixels)
    if scheme == "data":
        return _decode(io.BytesIO(_decode_data_url(text, max_bytes)), _short(text), exif_transpose, max_pixels)
    if scheme == "file":
        text = urllib.request.url2pathname(urllib.parse.urlparse(text).path)

    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "does not exist"
        raise ImageNotFoundError(
            f"Image file {str(path)!r} {what}; check the path (relative paths resolve from {os.getcwd()!r})."
        )
    return _decode(path, repr(str(path)), exif_transpose, max_pixels)


def load_pil_images(conversations: Iterable[Mapping[str, Any]], **load_kwargs: Any) -> list[Image.Image]:
    """Load the images of every message's optional "images" list, in conversation order.

    Entries may be anything `load_image` accepts (paths, URLs, PIL images, ...); `load_kwargs` are passed to it.
    With the defaults a path is opened exactly like the official `PIL.Image.open(path).convert("RGB")`.
    """
    images = []
    for message in conversations:
        entries = message.get("images") or []
        if isinstance(entries, (str, os.PathLike, Image.Image)):
            raise ImageLoadError(
                f"A message's 'images' must be a list, got a single {type(entries).__name__}; wrap it: [{entries!r}]."
            )
        images.extend(load_image(entry, **load_kwargs) for entry in entries)
    return images


def _decode(file: Path | io.BytesIO, name: str, exif_transpose: bool, max_pixels: int | None) -> Image.Image:
    """Open, check the size before decoding pixels, then decode fully so truncation errors surface here."""
    try:
        with Image.open(file) as image:
            _check_pixels(image, name, max_pixels)
            image.load()
            return _to_rgb(image, name, exif_transpose, max_pixels=None)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"Image {name} is too large ({error}); raise PIL.Image.MAX_IMAGE_PIXELS if you trust the source."
        ) from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{name} is not a readable image (unknown or corrupt format).") from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(
            f"Image {name} could not be decoded ({error}); the file is probably truncated or corrupt."
        ) from error


def _check_pixels(image: Image.Image, name: str, max_pixels: int | None) -> None:
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageLoadError(
            f"Image {name} has {image.width}x{image.height} = {image.width * image.height} pixels, more than "
            f"max_pixels={max_pixels}; resize it or pass a larger max_pixels."
        )


def _to_rgb(image: Image.Image, name: str, exif_transpose: bool, max_pixels: int | None) -> Image.Image:
    _check_pixels(image, name, max_pixels)
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray(_sixteen_to_eight(np.asarray(image)))
    return image.convert("RGB")


def _sixteen_to_eight(array: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (65535 / 255 = 257 exactly)."""
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageLoadError(
            f"numpy image must be HxW, HxWx1, HxWx3 or HxWx4 (channels last), got shape {array.shape}; "
            "transpose CHW arrays with array.transpose(1, 2, 0)."
        )
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        pixels = _sixteen_to_eight(array)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ImageLoadError(
                "float numpy images must hold finite values in [0, 1]; scale them (or pass uint8 0..255) first."
            )
        pixels = np.round(array.astype(np.float64) * 255).astype(np.uint8)
    else:
        raise ImageLoadError(f"Unsupported numpy image dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "deepseek-vl2"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(
                    f"Image URL {url} is {int(length)} bytes, more than max_bytes={max_bytes}; pass a larger max_bytes."
                )
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as error:
        raise ImageLoadError(f"Downloading image {url} failed with HTTP {error.code} {error.reason}.") from error
    except (socket.timeout, TimeoutError) as error:
        raise ImageLoadError(_timeout_message(url, timeout)) from error
    except urllib.error.URLError as error:
        if isinstance(error.reason, (socket.timeout, TimeoutError)):
            raise ImageLoadError(_timeout_message(url, timeout)) from error
        raise ImageLoadError(f"Could not download image {url}: {error.reason}.") from error
    if len(data) > max_bytes:
        raise ImageLoadError(f"Image URL {url} is larger than max_bytes={max_bytes}; pass a larger max_bytes.")
    return data


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ImageLoadError(f"Unsupported data URL {_short(url)}; expected 'data:image/<type>;base64,<payload>'.")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageLoadError(f"Data URL {_short(url)} holds more than max_bytes={max_bytes}; pass a larger max_bytes.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadError(f"Data URL {_short(url)} has an invalid base64 payload ({error}).") from error


def _timeout_message(url: str, timeout: float) -> str:
    return f"Downloading image {url} timed out after {timeout} s; retry or pass a larger timeout."


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
