"""Image loading for DeepSeek-VL2 conversations.

`load_pil_images` is the model card helper: it opens every message's "images" entry, in order, like the official
`PIL.Image.open(path).convert("RGB")` (no EXIF rotation, alpha dropped without compositing), so processor outputs
match the official ones; the one exception is 16-bit grayscale, which `convert` clips to white and this scales.
`load_image` is the general entry point behind it: paths, file:// URIs, http(s) URLs, base64 data URLs, raw bytes,
PIL images and numpy arrays, with clear errors instead of Pillow internals.

Careless or hostile inputs are refused, not half-loaded: more than `DEFAULT_MAX_PIXELS` pixels (checked from the
header, before decoding), PNGs whose pixel data stops early (Pillow would fill the rest with black), empty images,
paths that are not regular files (FIFOs, devices), and with `RemotePolicy(public_only=True)` URLs that resolve to
loopback, private, link-local or multicast addresses, checked again at every redirect.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import stat
import time
import zlib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_BYTES", "DEFAULT_MAX_PIXELS", "ImageLoadError", "ImageNotFoundError", "ImageSource", "RemotePolicy",
    "fetch_image_bytes", "image_size", "load_image", "load_pil_images",
]  # fmt: skip

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""Cap on downloaded / decoded encoded bytes (URLs, data URLs), so a wrong link cannot exhaust memory."""

DEFAULT_MAX_PIXELS = 50_000_000
"""Default cap on width * height: a 48-megapixel phone photo passes, a tiny file declaring 10000x10000 does not
(it would take 0.3 GB decoded, and the model sees at most a few megapixels of any image anyway)."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_URL_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]+://")  # two letters at least: C://x is a Windows path
_WHITESPACE = re.compile(r"[\t\n\f\r ]+")
# The base64 openings of PNG, JPEG, GIF, WebP and BMP files: a "path" starting so is image data pasted without its
# data URL prefix (as some APIs take it), which would otherwise be reported as a missing or too long file name.
_BARE_BASE64 = re.compile(r"(iVBORw0KGgo|/9j/|R0lGOD|UklGR|Qk[0-9A-Za-z+/]{2}AAAAAA)[0-9A-Za-z+/=\s]{32,}$")


class ImageLoadError(ValueError):
    """An image source could not be turned into an RGB PIL image; the message names the source and the fix."""


class ImageNotFoundError(ImageLoadError, FileNotFoundError):
    """The image file does not exist (also a FileNotFoundError, so generic handlers keep working)."""


@dataclass(frozen=True)
class RemotePolicy:
    """Which hosts an http(s) image may come from.

    A server that fetches URLs chosen by its clients sets `public_only`, so it cannot be used to reach the machine
    itself or its private network (SSRF): every address a host name resolves to must be globally routable, checked
    on each connection, redirects included; the connection goes to the checked address. `allowed` lists exceptions:
    host names, IP addresses or networks ("10.0.0.0/8"). Proxies from the environment are not used then.
    """

    public_only: bool = False
    allowed: tuple[str, ...] = ()

    def permits(self, host: str, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not self.public_only or (ip.is_global and not ip.is_multicast):
            return True
        for entry in self.allowed:
            if entry.lower() == host.lower():
                return True
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


def load_image(
    source: ImageSource,
    *,
    exif_transpose: bool = False,
    timeout: float = 10.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    remote: RemotePolicy | None = None,
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
        max_pixels: largest accepted width * height, checked before decoding. None keeps only Pillow's own
            decompression bomb guard (`PIL.Image.MAX_IMAGE_PIXELS`: a warning above it, an error above twice it),
            which applies in any case.
        remote: where http(s) URLs may point (default: anywhere, through the environment's proxies).

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
    if not text:
        raise ImageLoadError("Image path is empty; pass a file path or URL.")
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https"):
        data = _download(text, timeout, max_bytes, remote or RemotePolicy())
        return _decode(io.BytesIO(data), text, exif_transpose, max_pixels)
    if scheme == "data":
        return _decode(io.BytesIO(_decode_data_url(text, max_bytes)), _short(text), exif_transpose, max_pixels)
    if scheme == "file":
        url = urllib.parse.urlparse(text)
        if url.netloc not in ("", "localhost"):  # file://photos/a.jpg: "photos" is a host, not a folder
            raise ImageLoadError(
                f"file URL {_short(text)} names the host {url.netloc!r}; a local file is file:///absolute/path."
            )
        text = urllib.request.url2pathname(url.path)
    elif _URL_SCHEME.match(text):  # s3://, ftp://: not a path (its "//" would quietly become "/")
        raise ImageLoadError(
            f"Unsupported image URL {_short(text)}; pass a file path, or a file://, http(s):// or data: URL "
            "(download other URLs first)."
        )

    if _BARE_BASE64.match(text):
        raise ImageLoadError(
            f"Image path {_short(text)} is base64-encoded image data, not a path: pass it as a data URL "
            "(data:image/png;base64,...) or decode it to bytes."
        )
    path = _regular_file(text)
    return _decode(path, _short(str(path), 200), exif_transpose, max_pixels)


def fetch_image_bytes(
    url: str, *, timeout: float = 10.0, max_bytes: int = DEFAULT_MAX_BYTES, remote: RemotePolicy | None = None
) -> bytes:
    """The encoded bytes behind a data URL or an http(s) URL, not decoded: a server keeps these while a job waits."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_url(url, max_bytes)
    if scheme in ("http", "https"):
        return _download(url, timeout, max_bytes, remote or RemotePolicy())
    raise ImageLoadError(f"Unsupported image URL {_short(url)}; expected a data: or http(s): URL.")


def image_size(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of encoded image bytes from the header alone (nothing decoded), with `load_image`'s checks."""
    name = f"{len(data)} bytes of image data"
    try:
        with Image.open(io.BytesIO(data)) as image:
            _check_pixels(image, name, max_pixels)
            return image.size
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"Image {name} is too large ({error}).") from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"{name} is not a readable image (unknown or corrupt format).") from error


def _regular_file(text: str) -> Path:
    """The path as a regular file, or one clear error (missing, a folder, a FIFO or device, unusable name)."""
    shown = _short(text, 200)
    try:
        path = Path(text).expanduser()
    except RuntimeError as error:  # "~nouser/...": no such user, or no home directory
        raise ImageNotFoundError(f"Image path {shown} starts with '~' but that home directory is unknown.") from error
    except ValueError as error:  # an embedded NUL
        raise ImageLoadError(f"Image path {shown} cannot be used: {error}.") from error
    shown = _short(str(path), 200)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError as error:
        hint = "" if path.is_absolute() else f" (relative paths resolve from {os.getcwd()!r})"
        raise ImageNotFoundError(f"Image file {shown} does not exist; check the path{hint}.") from error
    except (OSError, ValueError) as error:  # name too long, embedded NUL, a file used as a folder, no permission
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ImageLoadError(f"Image path {shown} cannot be used: {reason}.") from error
    if stat.S_ISDIR(mode):
        raise ImageNotFoundError(f"Image file {shown} is a directory, not an image file; check the path.")
    if not stat.S_ISREG(mode):
        raise ImageLoadError(f"Image path {shown} is not a regular file (a FIFO, device or socket); pass an image.")
    return path


def load_pil_images(conversations: Iterable[Mapping[str, Any]], **load_kwargs: Any) -> list[Image.Image]:
    """Load the images of every message's optional "images" list, in conversation order.

    Entries may be anything `load_image` accepts (paths, URLs, PIL images, ...); `load_kwargs` are passed to it.
    With the defaults a path is opened like the official `PIL.Image.open(path).convert("RGB")` (16-bit grayscale
    aside: see `load_image`).
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
            if image.format == "PNG":
                _check_png_complete(file, name)
            return _to_rgb(image, name, exif_transpose, max_pixels=None)
    except PermissionError as error:
        raise ImageLoadError(f"Image {name} cannot be read: permission denied.") from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"Image {name} is too large ({error}): more than Pillow's own limit, above any max_pixels; resize it, "
            "or from Python raise PIL.Image.MAX_IMAGE_PIXELS if you trust the source."
        ) from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(f"{name} is not a readable image (unknown or corrupt format).") from error
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(
            f"Image {name} could not be decoded ({error}); the file is probably truncated or corrupt."
        ) from error


def _check_png_complete(file: Path | io.BytesIO, name: str) -> None:
    """Pillow fills the rows of a PNG whose compressed data ends early with black, without a word; refuse it."""
    data = file.read_bytes() if isinstance(file, Path) else file.getvalue()
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, color, interlace = data[24], data[25], data[28]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + -(-columns * channels * depth // 8))
    stream, position, produced = zlib.decompressobj(), 8, 0
    while position + 8 <= len(data) and produced < expected:
        length, kind = int.from_bytes(data[position : position + 4], "big"), data[position + 4 : position + 8]
        if kind == b"IDAT":
            chunk = data[position + 8 : position + 8 + length]
            while chunk and produced < expected:
                produced += len(stream.decompress(chunk, 1 << 20))
                chunk = stream.unconsumed_tail
        position += 12 + length
    if produced < expected:
        raise ImageLoadError(
            f"Image {name} is truncated: its pixel data stops after {produced * 100 // max(expected, 1)}% of the image."
        )


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_pixels(image: Image.Image, name: str, max_pixels: int | None) -> None:
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"Image {name} is empty ({image.width}x{image.height} pixels).")
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageLoadError(
            f"Image {name} has {image.width}x{image.height} = {image.width * image.height} pixels, more than "
            f"max_pixels={max_pixels}; resize it, or raise the limit (max_pixels=, --max-image-pixels)."
        )


def _to_rgb(image: Image.Image, name: str, exif_transpose: bool, max_pixels: int | None) -> Image.Image:
    _check_pixels(image, name, max_pixels)
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray(_sixteen_to_eight(np.asarray(image)))
    if image.mode == "La":  # premultiplied alpha: Pillow converts it to RGB only through LA
        image = image.convert("LA")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ImageLoadError(f"Image {name} has mode {image.mode!r}, which cannot be converted to RGB.") from error


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
    if array.size == 0:
        raise ImageLoadError(f"numpy image is empty (shape {array.shape}).")
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


def _download(url: str, timeout: float, max_bytes: int, policy: RemotePolicy) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "deepseek-vl2"})
    opener = _guarded_opener(policy) if policy.public_only else urllib.request.build_opener()
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(
                    f"Image URL {_short(url)} is {int(length)} bytes, more than max_bytes={max_bytes}; pass a larger max_bytes."
                )
            data = _read_within(response, max_bytes + 1, time.monotonic() + timeout)
            if data is None:
                raise ImageLoadError(_timeout_message(url, timeout))
    except urllib.error.HTTPError as error:
        raise ImageLoadError(f"Downloading image {_short(url)} failed with HTTP {error.code} {error.reason}.") from error
    except (socket.timeout, TimeoutError) as error:
        raise ImageLoadError(_timeout_message(url, timeout)) from error
    except urllib.error.URLError as error:
        if isinstance(error.reason, (socket.timeout, TimeoutError)):
            raise ImageLoadError(_timeout_message(url, timeout)) from error
        if isinstance(error.reason, _RefusedAddress):
            raise ImageLoadError(f"Image URL {_short(url)} refused: {error.reason}.") from error
        raise ImageLoadError(f"Could not download image {_short(url)}: {error.reason}.") from error
    except (OSError, http.client.HTTPException, ValueError) as error:  # reset connections, bad status lines
        raise ImageLoadError(f"Could not download image {_short(url)}: {error or type(error).__name__}.") from error
    if len(data) > max_bytes:
        raise ImageLoadError(f"Image URL {_short(url)} is larger than max_bytes={max_bytes}; pass a larger max_bytes.")
    return data


def _read_within(response: Any, limit: int, deadline: float) -> bytes | None:
    """Up to `limit` bytes of the body, or None past `deadline`: the socket timeout bounds each read, not the
    whole download, so a host trickling a byte at a time could otherwise hold a worker for ever."""
    chunks, size = [], 0
    while size < limit:
        if time.monotonic() > deadline:
            return None
        chunk = response.read1(min(1 << 16, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class _RefusedAddress(OSError):
    """A host resolved to an address that the RemotePolicy does not permit."""


def _guarded_opener(policy: RemotePolicy) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, no proxies, whose every connection (redirects too) goes to a permitted address."""

    def connect(address: tuple[str, int], timeout: Any = None, source_address: Any = None) -> socket.socket:
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise OSError(f"cannot resolve host {host!r}") from error
        refused = [info[4][0] for info in infos if not policy.permits(host, info[4][0])]
        if refused:
            raise _RefusedAddress(
                f"host {host!r} resolves to {refused[0]}, which is not a public address (loopback, private, "
                "link-local or multicast addresses are not fetched)"
            )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not None and timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    class HTTP(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class HTTPS(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            return self.do_open(HTTPS, req, context=self._context)

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler({}), urllib.request.UnknownHandler(), HTTPHandler(), HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):  # fmt: skip
        opener.add_handler(handler)
    return opener


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    """The payload of a base64 data URL; line breaks and spaces in it are skipped, as browsers do (`base64` wraps
    its output every 76 characters)."""
    header, sep, payload = url.partition(",")
    payload = _WHITESPACE.sub("", payload)
    if not sep or not header.lower().endswith(";base64"):
        raise ImageLoadError(f"Unsupported data URL {_short(url)}; expected 'data:image/<type>;base64,<payload>'.")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageLoadError(f"Data URL {_short(url)} holds more than max_bytes={max_bytes}; pass a larger max_bytes.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageLoadError(f"Data URL {_short(url)} has an invalid base64 payload ({error}).") from error


def _timeout_message(url: str, timeout: float) -> str:
    return f"Downloading image {_short(url)} timed out after {timeout} s; retry or pass a larger timeout."


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
