"""deepseek_vl.utils.io: every image source, mode conversion, and the error messages."""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepseek_vl.utils.io import (
    DEFAULT_MAX_PIXELS, ImageLoadError, ImageNotFoundError, RemotePolicy, image_size, load_image, load_pil_images,
)  # fmt: skip

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
RGBA = np.concatenate([RGB, RNG.integers(0, 256, (12, 16, 1), dtype=np.uint8)], axis=2)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_pixels(image: Image.Image, expected: np.ndarray) -> None:
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), expected)


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "rgb.png"
    Image.fromarray(RGB).save(path)
    return path


def test_path_str_and_file_uri(png):
    for source in (png, str(png), png.as_uri()):
        assert_pixels(load_image(source), RGB)


def test_bytes_and_data_url(png):
    data = png.read_bytes()
    assert_pixels(load_image(data), RGB)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert_pixels(load_image(url), RGB)
    with pytest.raises(ImageLoadError, match="expected 'data:image/<type>;base64,<payload>'"):
        load_image("data:image/png,rawbytes")
    with pytest.raises(ImageLoadError, match="invalid base64"):
        load_image("data:image/png;base64,!!!")
    with pytest.raises(ImageLoadError, match="max_bytes=10"):
        load_image(url, max_bytes=10)


def test_pil_and_numpy_sources():
    assert_pixels(load_image(Image.fromarray(RGB)), RGB)
    assert_pixels(load_image(RGB), RGB)
    assert_pixels(load_image(RGBA), RGB)  # alpha dropped, no compositing
    gray = RGB[..., 0]
    for array in (gray, gray[..., None]):
        assert_pixels(load_image(array), np.repeat(gray[..., None], 3, axis=2))
    assert_pixels(load_image(RGB.astype(np.uint16) * 257), RGB)
    assert_pixels(load_image(RGB / 255.0), RGB)
    assert_pixels(load_image((RGB / 255.0).astype(np.float32)), RGB)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 8, 8), np.uint8), "channels last"),
        (np.zeros((8, 8, 3), np.int64), "Unsupported numpy image dtype int64"),
        (np.full((8, 8, 3), 2.0), r"finite values in \[0, 1\]"),
        (np.full((8, 8), np.nan), r"finite values in \[0, 1\]"),
    ],
)
def test_bad_numpy(array, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(array)


def test_modes_convert_like_pillow(tmp_path):
    rgba = Image.fromarray(RGBA, "RGBA")
    assert_pixels(load_image(rgba), np.asarray(rgba.convert("RGB")))
    assert_pixels(load_image(rgba), RGB)  # RGB under transparent pixels is kept
    la = Image.fromarray(RGBA[..., [0, 3]], "LA")
    assert_pixels(load_image(la), np.repeat(RGBA[..., :1], 3, axis=2))
    palette = Image.fromarray(RGB).quantize(8)
    palette.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert_pixels(load_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))
    gray = Image.fromarray(RGB[..., 0], "L")
    assert_pixels(load_image(gray), np.repeat(RGB[..., :1], 3, axis=2))
    for mode in ("I", "F", "1", "CMYK"):
        image = gray.convert(mode)
        assert_pixels(load_image(image), np.asarray(image.convert("RGB")))


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 128, 129, 385, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    expected = np.array([0, 0, 1, 1, 128, 255], dtype=np.uint8)  # round(v / 257)
    assert_pixels(load_image(tmp_path / "g16.png"), np.repeat(expected[None, :, None], 3, axis=2))
    assert np.asarray(Image.open(tmp_path / "g16.png").convert("RGB"))[0, 4, 0] == 255  # what convert alone does


def test_exif_transpose(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(RGB).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "rot.jpg").size == (16, 12)  # official: raw pixels
    assert load_image(tmp_path / "rot.jpg", exif_transpose=True).size == (12, 16)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageNotFoundError, match="does not exist") as info:
        load_image(tmp_path / "missing.png")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert "missing.png" in str(info.value)
    with pytest.raises(ImageNotFoundError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="Cannot load an image from a int"):
        load_image(3)


def test_not_an_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("just some text")
    with pytest.raises(ImageLoadError, match="notes.png.*not a readable image"):
        load_image(fake)


def test_truncated_png(tmp_path, png):
    path = tmp_path / "cut.png"
    data = png_bytes(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png.*truncated or corrupt"):
        load_image(path)


def test_too_many_pixels(png, monkeypatch):
    with pytest.raises(ImageLoadError, match=r"16x12 = 192 pixels, more than max_pixels=100"):
        load_image(png, max_pixels=100)
    with pytest.raises(ImageLoadError, match="max_pixels=100"):
        load_image(RGB, max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # above 2x this Pillow raises DecompressionBombError
    with pytest.raises(ImageLoadError, match="too large.*MAX_IMAGE_PIXELS"):
        load_image(png)


def test_load_pil_images(png):
    conversation = [
        {"role": "<|User|>", "content": "<image><image>", "images": [str(png), Image.fromarray(RGBA, "RGBA")]},
        {"role": "<|Assistant|>", "content": "Two."},
        {"role": "<|User|>", "content": "<image>", "images": [png]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    images = load_pil_images(conversation)
    assert len(images) == 3
    for image in images:
        assert_pixels(image, RGB)
    assert load_pil_images([{"role": "<|User|>", "content": "Hi"}]) == []
    with pytest.raises(ImageLoadError, match="must be a list"):
        load_pil_images([{"role": "<|User|>", "content": "<image>", "images": str(png)}])


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 (http.server API)
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("?to=", 1)[1])
            self.end_headers()
            return
        if self.path == "/slow.png":
            time.sleep(1.0)
        if self.path == "/missing.png":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if self.path != "/nolength.png":
            self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        try:
            self.wfile.write(self.payload)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    _Handler.payload = png_bytes(Image.fromarray(RGB))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_url(server):
    assert_pixels(load_image(f"{server}/image.png"), RGB)
    assert_pixels(load_image(f"{server}/nolength.png"), RGB)


def test_http_size_cap(server):
    with pytest.raises(ImageLoadError, match="more than max_bytes=100"):
        load_image(f"{server}/image.png", max_bytes=100)
    with pytest.raises(ImageLoadError, match="larger than max_bytes=100"):
        load_image(f"{server}/nolength.png", max_bytes=100)


def test_http_timeout_and_errors(server):
    with pytest.raises(ImageLoadError, match="timed out after 0.2 s"):
        load_image(f"{server}/slow.png", timeout=0.2)
    with pytest.raises(ImageLoadError, match="HTTP 404"):
        load_image(f"{server}/missing.png")


def _png_with_rows(width: int, height: int, rows: int) -> bytes:
    """A PNG declaring width x height whose (complete, valid) zlib stream holds only `rows` rows of pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = b"".join(b"\x00" + b"\xff" * width * 3 for _ in range(rows))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def test_png_with_missing_rows_is_refused_not_blackened():
    assert load_image(_png_with_rows(20, 200, 200)).size == (20, 200)
    with pytest.raises(ImageLoadError, match="truncated: its pixel data stops after 5%"):
        load_image(_png_with_rows(20, 200, 10))
    interlaced = io.BytesIO()
    Image.fromarray(RGB).save(interlaced, format="PNG", interlace=1)  # Pillow writes no Adam7; check it parses anyway
    assert_pixels(load_image(interlaced.getvalue()), RGB)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_default_pixel_limit_stops_tiny_files_declaring_huge_images():
    bomb = _png_with_rows(10000, 10000, 0)
    assert len(bomb) < 200
    expected = f"10000x10000 = 100000000 pixels, more than max_pixels={DEFAULT_MAX_PIXELS}"
    with pytest.raises(ImageLoadError, match=expected):
        load_image(bomb)
    with pytest.raises(ImageLoadError, match="more than max_pixels"):
        image_size(bomb)
    assert image_size(png_bytes(Image.fromarray(RGB))) == (16, 12)


@pytest.mark.parametrize("array", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 5), np.uint8)])
def test_empty_images_are_refused(array):
    with pytest.raises(ImageLoadError, match="is empty"):
        load_image(array.astype(np.float32))
    with pytest.raises(ImageLoadError, match="is empty"):
        load_image(array)
    with pytest.raises(ImageLoadError, match="is empty"):
        load_image(Image.new("RGB", (0, 0)))


def test_unusable_paths_are_one_clear_error(tmp_path):
    with pytest.raises(ImageLoadError, match="cannot be used: File name too long") as info:
        load_image("a" * 5000)
    assert len(str(info.value)) < 400
    with pytest.raises(ImageNotFoundError, match="home directory is unknown"):
        load_image("~nosuchuser_h10/x.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)  # never opened: opening a FIFO would block
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image("/dev/null")


def test_bare_base64_image_data_is_named_as_such():
    """Image data pasted without its data URL prefix is neither a missing file nor a too long file name."""
    for fmt in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt)
        encoded = base64.b64encode(buffer.getvalue()).decode()
        with pytest.raises(ImageLoadError, match="is base64-encoded image data, not a path: pass it as a data URL"):
            load_image(encoded)
        assert load_image(f"data:image/{fmt.lower()};base64,{encoded}").size == (8, 8)
    with pytest.raises(ImageNotFoundError, match="does not exist"):
        load_image("Qk_photos/holiday.png")  # a path that merely starts like BMP's base64 is still a path


def test_public_only_policy_refuses_local_addresses_and_redirects(server):
    public = RemotePolicy(public_only=True)
    port = server.rsplit(":", 1)[1]
    for host in ("127.0.0.1", "localhost", "0.0.0.0", "[::1]"):
        with pytest.raises(ImageLoadError, match="not a public address"):
            load_image(f"http://{host}:{port}/image.png", remote=public)
    with pytest.raises(ImageLoadError, match="not a public address"):
        load_image(f"{server}/redirect?to=http://127.0.0.2:{port}/x.png", remote=RemotePolicy(True, ("127.0.0.1",)))
    assert_pixels(load_image(f"{server}/image.png", remote=RemotePolicy(True, ("127.0.0.0/8",))), RGB)
    redirected = load_image(f"{server}/redirect?to={server}/image.png", remote=RemotePolicy(True, ("127.0.0.1",)))
    assert_pixels(redirected, RGB)
    for address in ("10.1.2.3", "192.168.0.1", "169.254.169.254", "224.0.0.1", "::ffff:127.0.0.1", "fe80::1"):
        assert not public.permits("example.com", address)
    assert public.permits("example.com", "93.184.216.34") and RemotePolicy().permits("x", "127.0.0.1")


@pytest.mark.parametrize("path", ["a" * 5000, "~nosuchuser_h10/x.png", "/dev/null"])
def test_cli_bad_image_path_is_one_line(path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "deepseek_vl", "generate", "hi", "-i", path], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("deepseek-vl2:")]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
