"""What current OpenAI clients send to the HTTP API, checked against `VLChat` called directly (Tiny checkpoint)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image
from test_server import MODEL, data_url, serve, tiny_chat, user

from deepseek_vl.chat import VLChat
from deepseek_vl.serve.server import create_app


@pytest.fixture(scope="module")
def chat() -> VLChat:
    return tiny_chat()


@pytest.fixture(scope="module")
def client(chat: VLChat) -> Iterator[OpenAI]:
    with serve(create_app(chat, model_name=MODEL)) as url:
        yield OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, http_client=httpx.Client(trust_env=False))


def answer(client: OpenAI, messages: list[dict], **options):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, **options)


def test_system_messages_anywhere_form_the_one_system_prompt(client: OpenAI, chat: VLChat):
    """OpenAI takes system messages anywhere; DeepSeek's templates gather them, in order, before the first turn."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Answer in English."},
        user("Hello!"),
        {"role": "assistant", "content": "Hi."},
        {"role": "system", "content": [{"type": "text", "text": "Be polite."}]},
        user("Who are you?"),
    ]
    expected = chat.chat(
        [{"role": "system", "content": "Be brief.\n\nAnswer in English.\n\nBe polite."},
         {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
         {"role": "user", "content": "Who are you?"}], max_new_tokens=8,
    )  # fmt: skip
    response = answer(client, messages)
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens


def test_fields_of_the_current_openai_client_are_accepted(client: OpenAI):
    """An image's detail "original" and the prompt-cache hints change nothing: this server tiles and caches alone."""
    image = data_url(Image.new("RGB", (64, 48), (200, 10, 10)))
    plain = answer(client, [user("Describe.", image)])
    hinted = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image, "detail": "original"},
         "prompt_cache_breakpoint": {"mode": "explicit"}},
        {"type": "text", "text": "Describe.", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}},
    ]}]  # fmt: skip
    extra = {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "prompt_cache_retention": "24h"}
    response = answer(client, hinted, extra_body=extra)
    assert response.choices[0].message.content == plain.choices[0].message.content
    assert response.usage.model_dump() == plain.usage.model_dump()


def test_a_flood_of_empty_messages_is_refused_before_tokenizing(client: OpenAI, chat: VLChat, monkeypatch):
    """Each turn takes a token of the template: 100k empty messages (3 MB) took 15 s to tokenize before the 400."""

    def tokenize(*args, **kwargs):
        raise AssertionError("tokenized a prompt that cannot fit")

    monkeypatch.setattr(chat, "count_prompt_tokens", tokenize)
    context = chat.model.config.language_config.max_position_embeddings
    with pytest.raises(openai.BadRequestError, match="messages; each takes at least one token") as error:
        answer(client, [{"role": "user", "content": ""}] * (context + 1))
    assert error.value.code == "context_length_exceeded"
