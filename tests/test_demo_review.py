"""The Gradio demo driven through its API with `gradio_client`, as a browser session would: the cases that need
precise timing (Clear or a second Send while an answer streams, Stop while a turn is prepared) and several images.

Each test is its own session (a new `Client`); the demo runs the Tiny golden checkpoint on a free 127.0.0.1 port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("gradio")

from golden import GOLDEN
from gradio_client import Client, handle_file
from PIL import Image
from test_server import GIRAFFES, GROUNDED, forced_answer, free_port, tiny_chat

from deepseek_vl.engine.runner import ModelRunner
from deepseek_vl.grounding import label_colors
from deepseek_vl.serve.demo import BUSY, build_demo, launch

COUNTING = " ".join(str(n) for n in range(1, 101))
DEFAULTS = (0.0, 1.0, 300, 1.0)  # temperature, top_p, max new tokens, repetition penalty


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    port = free_port()
    demo = build_demo(tiny_chat(), max_images=3)
    launch(demo, port=port, prevent_thread_lock=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


def session(url: str) -> Client:
    return Client(url, verbose=False)


def send(client: Client, prompt: str, *images: Any, max_new_tokens: int = 2, api_name: str = "/respond") -> tuple:
    """One Send, waited for: (chatbot, annotated image, status, prompt box)."""
    gallery = [{"image": handle_file(str(image)), "caption": None} for image in images]
    return client.predict(prompt, gallery, [], *DEFAULTS[:2], max_new_tokens, DEFAULTS[3], api_name=api_name)


def streaming(client: Client, prompt: str) -> Any:
    """Start an answer and return its job once its first pieces have arrived."""
    job = client.submit(prompt, [], [], *DEFAULTS, api_name="/respond")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3:  # "Generating...", then two pieces
        assert time.monotonic() < deadline and not job.done(), "the answer did not start streaming"
        time.sleep(0.05)
    return job


def test_grounding_on_the_last_of_several_images_is_drawn(demo_url: str):
    """The boxes refer to the conversation's last image; they were parsed with its index but drawn for index 0,
    so with two images the grounding panel showed the image without any box."""
    with forced_answer(tiny_chat(), GROUNDED):
        _, annotated, status, _ = send(
            session(demo_url), "<|ref|>The giraffe at the back<|/ref|>.", GOLDEN / "images" / "multi_image_1.jpeg",
            GIRAFFES, max_new_tokens=64,
        )  # fmt: skip
    assert status.endswith("Boxes: The giraffe at the back [100, 200, 500, 999]")
    drawn, original = Image.open(annotated["value"]).convert("RGB"), Image.open(GIRAFFES)
    assert drawn.size == original.size
    left_edge = (round(100 / 999 * original.width), round(600 / 999 * original.height))
    assert drawn.getpixel(left_edge) == label_colors(["The giraffe at the back"])["The giraffe at the back"]


def test_clear_while_an_answer_streams_starts_a_new_conversation(demo_url: str):
    client = session(demo_url)
    with forced_answer(tiny_chat(), COUNTING, step_seconds=0.05):
        job = streaming(client, "Count to one hundred.")
        client.predict(api_name="/clear_chat")
        job.result(timeout=60)
    assert send(client, "Hi")[2].startswith("Turn 1: 7 prompt")  # not turn 2 of the cleared conversation


def test_a_second_send_while_an_answer_streams_is_refused(demo_url: str):
    """Enter pressed while Send's answer streams ran a second answer on the same conversation: Stop then reached
    neither, and the turn that finished first was lost from the conversation the model sees."""
    client = session(demo_url)
    with forced_answer(tiny_chat(), COUNTING, step_seconds=0.05):
        job = streaming(client, "Count to one hundred.")
        assert send(client, "Hello?", api_name="/respond_1")[2] == BUSY
        client.predict(api_name="/stop")
        assert "(stopped)" in job.result(timeout=60)[2]
    assert send(client, "Hi")[2].startswith("Turn 2:")


def test_stop_while_the_turn_is_prepared_stops_it(demo_url: str, monkeypatch: pytest.MonkeyPatch):
    count = tiny_chat().count_prompt_tokens

    def slow_count(*args: Any, **kwargs: Any) -> int:
        time.sleep(1.0)  # as loading and tiling several large images does
        return count(*args, **kwargs)

    monkeypatch.setattr(tiny_chat(), "count_prompt_tokens", slow_count)
    client = session(demo_url)
    with forced_answer(tiny_chat(), COUNTING, step_seconds=0.05):
        job = client.submit("Count to one hundred.", [], [], *DEFAULTS, api_name="/respond")
        time.sleep(0.5)
        client.predict(api_name="/stop")
        status = job.result(timeout=60)[2]
    assert status.endswith("(stopped)") and int(status.split("+ ")[1].split()[0]) < 10


def test_a_failed_answer_is_reported_and_not_kept(demo_url: str, monkeypatch: pytest.MonkeyPatch):
    """A failing generation left the status at "Generating..." and the failed turn in the chat, although the
    conversation the model sees does not have it."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory")

    client = session(demo_url)
    monkeypatch.setattr(ModelRunner, "decode", fail)
    chatbot, _, status, prompt = send(client, "Hi")
    assert status.startswith("⚠️ The answer failed (RuntimeError: out of memory)")
    assert (chatbot, prompt) == ([], "Hi")  # the turn is not shown, the question is back in the box to resend
    monkeypatch.undo()
    assert send(client, "Hi")[2].startswith("Turn 1:")


def test_exif_transpose_turns_uploads_upright(tmp_path) -> None:
    """A phone photo (EXIF orientation 6) is shown upright by the browser; `demo --exif-transpose` gives the model
    and the grounding panel that upright image too, and without it they keep the official (stored) pixels."""
    from deepseek_vl.serve.cli import build_parser
    from deepseek_vl.serve.demo import _load_upload

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (200, 30, 30)).save(tmp_path / "phone.jpg", exif=exif)
    assert _load_upload(str(tmp_path / "phone.jpg"), 10**6).size == (40, 20)
    assert _load_upload(str(tmp_path / "phone.jpg"), 10**6, exif_transpose=True).size == (20, 40)
    assert build_parser().parse_args(["demo", "--exif-transpose"]).exif_transpose is True
    assert build_parser().parse_args(["demo"]).exif_transpose is False
