"""Second review of the Gradio demo, driven through its API with `gradio_client` as a browser session would:
the messages a user gets when a prompt's image tags, its length or the context's room do not fit.

The demo runs the Tiny golden checkpoint on a free 127.0.0.1 port; each test is its own session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("gradio")

import test_demo_review
from PIL import Image
from test_demo_review import COUNTING, send, session
from test_server import forced_answer, tiny_chat

demo_url = test_demo_review.demo_url  # the same demo fixture (one demo per module)


def context() -> int:
    return int(tiny_chat().model.config.language_config.max_position_embeddings)


def test_a_tagged_prompt_sent_again_says_the_images_are_already_in_the_conversation(demo_url: str, tmp_path: Path):
    """The model card's three-image example sent twice: the gallery still shows its images, but they were sent with
    the first turn, so the second has tags and no images. The user was told "message 2 has 2 <image> tags but 0
    images; give one image per tag", about a message they cannot see and images they had given."""
    images = [tmp_path / f"{n}.png" for n in range(2)]
    for n, image in enumerate(images):
        Image.new("RGB", (32, 32), (200 * n, 50, 50)).save(image)
    client = session(demo_url)
    prompt = "This is image_1: <image>\nThis is image_2: <image>\n What is in the images?"
    assert send(client, prompt, *images, max_new_tokens=1)[2].startswith("Turn 1:")
    status = send(client, prompt, *images, max_new_tokens=1)[2]
    assert status.startswith("⚠️ The prompt has 2 <image> tags but 0 new images: images sent in earlier turns stay")
    assert send(client, "What is in the images?", *images, max_new_tokens=1)[2].startswith("Turn 2:")


def test_a_first_prompt_longer_than_the_context_is_told_to_shorten_it(demo_url: str):
    """Too long a first prompt was told "press Clear", which empties nothing and leaves it as long."""
    status = send(session(demo_url), "hello " * context(), max_new_tokens=1)[2]
    assert status == (
        f"⚠️ The prompt and its images leave no room in the model's {context()}-token context: shorten the prompt "
        "or send fewer or smaller images."
    )


def test_an_answer_cut_by_the_context_says_so(demo_url: str):
    """An answer capped by the context's room, not by the slider, was reported as stopped at max new tokens."""
    prompt = "hello " * (context() - 10)
    room = context() - tiny_chat().count_prompt_tokens([{"role": "user", "content": prompt}])
    assert 0 < room < 300
    with forced_answer(tiny_chat(), COUNTING):
        status = send(session(demo_url), prompt, max_new_tokens=300)[2]
    assert status.endswith(f"+ {room} answer tokens (stopped: the context is full, press Clear)")
    with forced_answer(tiny_chat(), COUNTING):
        assert send(session(demo_url), "Count.", max_new_tokens=3)[2].endswith("(stopped at max new tokens)")
