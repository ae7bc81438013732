"""Property tests (hypothesis) for the inputs a careless or hostile caller controls: images, text, model answers.

Each property states what must hold for every input: a clear `ValueError` (or a result), never an internal error
from Pillow, torch or the tokenizer, and never a silently wrong result. A few hundred examples run in the normal
suite; set DEEPSEEK_VL_FUZZ_EXAMPLES=5000 for a long run.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
from golden import checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from deepseek_vl.chat import _StopPrefixes
from deepseek_vl.grounding import MAX_COORD, draw_grounding, parse_grounding, strip_grounding_markup
from deepseek_vl.models import DeepseekVLV2Processor
from deepseek_vl.utils.io import ImageLoadError, image_size, load_image

EXAMPLES = int(os.environ.get("DEEPSEEK_VL_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROCESSOR_FUZZ = settings(FUZZ, max_examples=max(EXAMPLES // 4, 10))  # each example tiles and normalises
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "PA", "La", "RGBa", "HSV", "LAB"]


@pytest.fixture(scope="module")
def processor() -> DeepseekVLV2Processor:
    return DeepseekVLV2Processor.from_pretrained(checkpoint("tiny"))


@st.composite
def pil_images(draw: st.DrawFn) -> Image.Image:
    mode = draw(st.sampled_from(MODES))
    size = (draw(st.integers(0, 40)), draw(st.integers(0, 40)))
    image = Image.new(mode, size)
    if size[0] and size[1] and mode not in ("P", "PA"):
        noise = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (size[1], size[0], 3), np.uint8)
        image = Image.fromarray(noise).convert(mode) if mode not in ("I;16", "La", "RGBa", "PA") else image
    return image


@PROCESSOR_FUZZ
@given(image=pil_images(), question=st.text(max_size=40))
def test_processor_takes_any_image_mode_or_refuses_clearly(processor, image: Image.Image, question: str):
    conversation = [
        {"role": "<|User|>", "content": f"<image>\n{question}"},
        {"role": "<|Assistant|>", "content": ""},
    ]
    try:
        out = processor.process_one(conversations=conversation, images=[image])
    except ValueError as error:  # empty images and lone surrogates, both named
        assert "empty" in str(error) or "surrogate" in str(error)
        assert image.width * image.height == 0 or any(0xD800 <= ord(c) <= 0xDFFF for c in question)
        return
    tiles = out.images.shape[0]
    assert out.images.shape[1:] == (3, processor.image_size, processor.image_size)
    assert int(out.images_seq_mask.sum()) == out.num_image_tokens[0] == processor.image_token_count(image.size)
    assert tiles == 1 + int(out.images_spatial_crop[0].prod())
    assert torch_finite(out.images)


def torch_finite(tensor) -> bool:
    return bool(tensor.isfinite().all())


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P", "LA", "1", "CMYK"])
def test_processor_converts_non_rgb_like_load_image(processor, mode: str):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 50, 3), np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((30, 50), 40000, np.uint16))
    direct = processor.tokenize_with_images("<image>", [image]).images
    expected = processor.tokenize_with_images("<image>", [load_image(image)]).images
    assert all((a == b).all() for a, b in zip(direct, expected))


def test_processor_refuses_empty_images_and_lone_surrogates(processor):
    with pytest.raises(ValueError, match=r"empty \(0x0 pixels\)"):
        processor.tokenize_with_images("<image>", [Image.new("RGB", (0, 0))])
    with pytest.raises(ValueError, match="lone surrogate"):
        processor.process_one(prompt="a \ud800 b")
    conversation = [{"role": "<|User|>", "content": "hi \udfff"}, {"role": "<|Assistant|>", "content": ""}]
    with pytest.raises(ValueError, match="lone surrogate"):
        processor.process_one(conversations=conversation, images=[])


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """Valid PNG/JPEG/GIF/BMP/WebP files, then maybe cut short or with bytes flipped."""
    width, height = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    noise = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (height, width, 3), np.uint8)
    image = Image.fromarray(noise).convert(draw(st.sampled_from(["RGB", "L", "RGBA", "P"])))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
    buffer = io.BytesIO()
    (image.convert("RGB") if fmt == "JPEG" else image).save(buffer, format=fmt)
    data = bytearray(buffer.getvalue())
    damage = draw(st.sampled_from(["none", "cut", "flip"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            data[position] ^= draw(st.integers(1, 255))
    return bytes(data)


@FUZZ
@given(data=st.one_of(encoded_images(), st.binary(max_size=300)))
def test_image_loading_gives_rgb_or_one_clear_error(data: bytes):
    try:
        image = load_image(data)
    except ImageLoadError as error:
        assert str(error) and "\n" not in str(error)
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
    assert image_size(data) == image.size


@FUZZ
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=4), dtype=st.sampled_from(["uint8", "uint16", "float32",
                                                                                          "int64", "bool", "float64"]))
def test_numpy_images_give_rgb_or_one_clear_error(shape: list[int], dtype: str):
    array = np.zeros(shape, dtype=dtype)
    try:
        image = load_image(array)
    except ImageLoadError:
        return
    assert image.mode == "RGB" and image.size == (shape[1], shape[0])


@FUZZ
@given(
    path=st.text(min_size=1, max_size=300)
    | st.sampled_from(["~nouser/x.png", "a" * 5000, "/dev/null", "/", "\0", "~\0", "\ud800.png"])
)
def test_image_paths_give_one_clear_error(path: str):
    try:
        load_image(path)
    except ImageLoadError as error:
        assert len(str(error)) < 600


_PIECES = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|de", "t|>", "<|", "|>", "[", "]", "[[",
           "]]", ",", " ", "0", "999", "1000", "-5", "12.5", "1e400", "label", "\n", "\ud800", "x" * 50]


@FUZZ
@given(parts=st.lists(st.sampled_from(_PIECES) | st.text(max_size=5), max_size=40), seed=st.integers(0, 99))
def test_grounding_parser_never_raises_and_boxes_are_valid(parts: list[str], seed: int):
    text = "".join(parts)
    size = (random.Random(seed).randint(1, 5000), random.Random(seed + 1).randint(1, 5000))
    result = parse_grounding(text, [size])
    for box in result.boxes:
        x1, y1, x2, y2 = box.box
        assert 0 <= x1 <= x2 <= MAX_COORD and 0 <= y1 <= y2 <= MAX_COORD
        assert 0 <= box.pixels[2] <= size[0] and 0 <= box.pixels[3] <= size[1]
    for tag in ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>"):
        assert tag not in result.text and tag not in strip_grounding_markup(text)
    if result.boxes and random.Random(seed).random() < 0.2:
        assert draw_grounding(Image.new("RGB", (32, 24)), result).size == (32, 24)


@FUZZ
@given(
    stops=st.lists(st.text("ab", min_size=1, max_size=8), min_size=1, max_size=4),
    pieces=st.lists(st.text("abc", max_size=4), max_size=12),
)
def test_stop_prefix_matching_equals_the_quadratic_definition(stops: list[str], pieces: list[str]):
    """The linear-time matcher gives the longest end of the text that begins a stop string, token after token."""
    matcher, text = _StopPrefixes(stops), ""
    for piece in pieces:
        text += piece
        if any(stop in text for stop in stops):
            break
        expected = max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        assert matcher.longest(text) == expected
