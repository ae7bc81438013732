"""Regressions found by using `deepseek-vl2 generate/chat/batch`, grounding drawing and image loading as a user:
each test fails without its fix. In-process, with the session's Tiny model where one is needed."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import deepseek_vl.serve.batch as batch
import deepseek_vl.serve.cli as cli_module
from deepseek_vl.chat import VLChat
from deepseek_vl.grounding import draw_grounding, label_colors, parse_grounding
from deepseek_vl.serve.cli import main
from deepseek_vl.utils.io import ImageLoadError, load_image
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
SMALL_IMAGE = str(GOLDEN / "images" / "tiny_8x8.png")
GREY = (128, 128, 128)


@pytest.fixture
def loaded(tiny: VLChat, monkeypatch: pytest.MonkeyPatch) -> VLChat:
    monkeypatch.setattr(cli_module, "load_chat", lambda args: tiny)
    monkeypatch.setattr(batch, "load_chat", lambda args: tiny)
    return tiny


@pytest.fixture
def not_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_module, "load_chat", lambda args: pytest.fail("the model loaded"))


def test_annotate_draws_the_boxes_of_the_last_of_several_images(loaded, monkeypatch, tmp_path: Path, capsys) -> None:
    """The answer's boxes belong to the last image (image_index 1 here); they were filtered out as not image 0's."""
    monkeypatch.setattr(loaded, "_decode", lambda tokens: "<|ref|>cat<|/ref|><|det|>[[0, 0, 499, 499]]<|/det|>")
    first, second, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "boxes.png"
    Image.new("RGB", (64, 48), GREY).save(first)
    Image.new("RGB", (100, 80), GREY).save(second)
    args = ["generate", "<image> <image> Where is the cat?", "-i", str(first), "-i", str(second), "--json"]
    assert main([*args, "--model", TINY, "--max-new-tokens", "2", "--annotate", str(out)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["boxes"][0]["image_index"] == 1 and "(1 boxes)" in captured.err
    drawn = Image.open(out)
    assert drawn.size == (100, 80) and drawn.getpixel((0, 30)) == label_colors(["cat"])["cat"]


@pytest.mark.parametrize(
    ("name", "message"), [("boxes.psd", "use an image file extension"), ("folder.png", "is a directory")]
)
def test_annotate_that_cannot_be_written_fails_before_the_model_loads(
    not_loaded, tmp_path: Path, capsys, name: str, message: str
) -> None:
    (tmp_path / "folder.png").mkdir()  # Pillow reads .psd but cannot write it: a KeyError after the answer
    assert main(["generate", "hi", "-i", SMALL_IMAGE, "--annotate", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_annotate_save_failure_is_one_line_after_the_answer(loaded, tmp_path: Path, capsys) -> None:
    out = tmp_path / "boxes.xbm"  # a format for 1-bit images only
    assert main(["generate", "hi", "-i", SMALL_IMAGE, "--max-new-tokens", "1", "--annotate", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip() and "cannot write" in captured.err and "XBM" in captured.err


@pytest.mark.parametrize("prompt", ["", "  \n"])
def test_empty_prompt_without_images_is_refused(not_loaded, capsys, prompt: str) -> None:
    assert main(["generate", prompt]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_chat_help_command(loaded, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n"))
    assert main(["chat", "--model", TINY]) == 0
    captured = capsys.readouterr()
    assert "unknown command" not in captured.err and "/reset clears the conversation" in captured.out


def test_input_that_is_not_utf8_is_named_in_the_users_terms(loaded, not_loaded, monkeypatch, capsys) -> None:
    """A Latin-1 byte arrives as a lone surrogate (surrogateescape): stdin is refused before the model loads, a chat
    line is that line's error; both say which byte, not the tokenizer's 'lone surrogate'."""
    latin1 = b"caf\xe9?\n".decode("utf-8", "surrogateescape")
    monkeypatch.setattr("sys.stdin", io.StringIO(latin1))
    assert main(["generate", "-"]) == 2
    assert "stdin is not UTF-8 (byte 0xe9 at character 4)" in capsys.readouterr().err
    monkeypatch.setattr(cli_module, "load_chat", lambda args: loaded)
    monkeypatch.setattr("sys.stdin", io.StringIO(latin1 + "/exit\n"))
    assert main(["chat", "--model", TINY]) == 0
    err = capsys.readouterr().err
    assert "the line is not UTF-8 (byte 0xe9 at character 4)" in err and "surrogate" not in err


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "Image path is empty"),
        ("s3://bucket/cat.jpg", "Unsupported image URL 's3://bucket/cat.jpg'"),
        ("file://images/cat.jpg", "names the host 'images'; a local file is file:///absolute/path"),
    ],
)
def test_image_sources_that_are_not_paths_say_so(source: str, message: str) -> None:
    with pytest.raises(ImageLoadError, match=message):
        load_image(source)


def test_data_url_with_line_breaks_loads() -> None:
    """`base64 photo.png` wraps every 76 characters; browsers skip the whitespace of a data URL."""
    pixels = np.arange(48 * 3, dtype=np.uint8).reshape(6, 8, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    payload = base64.encodebytes(buffer.getvalue()).decode()
    assert "\n" in payload.strip()
    np.testing.assert_array_equal(np.asarray(load_image("data:image/png;base64,\n" + payload)), pixels)


def test_draw_on_a_16_bit_image_shows_what_the_model_saw() -> None:
    """`convert("RGB")` clips 16-bit values above 255 to white; the drawing starts from load_image's scaled pixels."""
    image = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))
    assert image.mode == "I;16"
    drawn = draw_grounding(image, parse_grounding("no boxes"))
    assert drawn.tobytes() == load_image(image).tobytes()
    assert len(np.unique(np.asarray(drawn)[..., 0])) == 64


def test_batch_output_that_is_a_folder_is_one_clear_line(monkeypatch, tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    assert main(["batch", "in.jsonl", "."]) == 2
    assert "cannot write '.': it is a directory" in capsys.readouterr().err


def test_batch_empty_image_path_is_the_lines_error(loaded, tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi", "images": [""]}\n')
    assert main(["batch", str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--max-new-tokens", "1"]) == 1
    assert "Image path is empty" in json.loads((tmp_path / "out.jsonl").read_text())["error"]
