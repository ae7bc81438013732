"""transformers/OpenAI-style chat messages for the DeepSeek-VL2 processor (`processor.apply_chat_template`).

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<|ref|>A giraffe<|/ref|>."}]}]
    processor.apply_chat_template(messages, add_generation_prompt=True)
    # '<|User|>: <image>\\n<|ref|>A giraffe<|/ref|>.\\n\\n<|Assistant|>:'   (the model card's prompt)

An image part renders as `<image>` and a line break, as in the model card's prompts ("<image>\\n<|ref|>...",
"This is image_1: <image>\\nThis is image_2: ..."); text parts are joined as they are. The official template
(and its quirks, see conversation.py) then renders the conversation, so the string is the official `sft_format`.
`tokenize=True` returns the processor's batch for those messages, images taken from the image parts.
"""

from __future__ import annotations

from typing import Any

from deepseek_vl.utils.io import load_image

__all__ = ["apply_chat_template", "to_official_conversation"]

_ROLES = {"user": "<|User|>", "assistant": "<|Assistant|>", "system": "system", "developer": "system"}
_OFFICIAL = {"<|User|>", "<|Assistant|>"}


def to_official_conversation(messages: list[dict[str, Any]], image_token: str = "<image>") -> tuple[list[dict], list]:
    """Messages with string or content-part lists -> official-role messages with `<image>` tags, and the image
    sources of the parts that carry one (`image`, `url`, `path`, or OpenAI's `image_url.url`), in order."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    conversation, sources = [], []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        role = message["role"] if message["role"] in _OFFICIAL else _ROLES.get(str(message["role"]).lower())
        if role is None:
            raise ValueError(f"message {index} has unknown role {message['role']!r}; use user, assistant or system")
        content = message["content"]
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    pieces.append(str(part.get("text", "")))
                elif kind in ("image", "image_url"):
                    pieces.append(f"{image_token}\n")
                    source = part.get("image", part.get("url", part.get("path")))
                    if kind == "image_url":
                        url = part.get("image_url")
                        source = url.get("url") if isinstance(url, dict) else url
                    if source is not None:
                        sources.append(source)
                else:
                    raise ValueError(
                        f"message {index} has a content part {part!r}; use {{'type': 'text', 'text': ...}} or "
                        "{'type': 'image'} (optionally with 'image', 'url' or 'path')"
                    )
            content = "".join(pieces)
        elif not isinstance(content, str):
            raise ValueError(f"message {index}: content must be a string or a list of parts")
        conversation.append({"role": role, "content": content})
    return conversation, sources


def apply_chat_template(
    processor: Any,
    conversation: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tokenize: bool = False,
    system_prompt: str = "",
    **kwargs: Any,
) -> Any:
    """The prompt string (the official `sft_format`), or with `tokenize=True` the processor's batch.

    `add_generation_prompt` appends the open assistant turn the model completes (the model card's messages
    already end with `{"role": "<|Assistant|>", "content": ""}`). `system_prompt` is the official argument,
    which appears in the string only; a `system` message reaches the tokens.
    """
    if kwargs:
        unknown = sorted(set(kwargs) - {"return_dict", "return_tensors", "chat_template"})
        if unknown:
            raise ValueError(f"apply_chat_template does not take {unknown}")
    messages, sources = to_official_conversation(conversation, processor.image_token)
    if add_generation_prompt and messages[-1]["role"] != "<|Assistant|>":
        messages.append({"role": "<|Assistant|>", "content": ""})
    if not tokenize:
        return processor.format_messages(messages, system_prompt=system_prompt)
    tags = sum(message["content"].count(processor.image_token) for message in messages)
    if len(sources) != tags:
        raise ValueError(
            f"tokenize=True needs every image part to carry its image ({tags} images, {len(sources)} given)"
        )
    images = [load_image(source) for source in sources]
    return processor(conversations=messages, images=images, force_batchify=True, system_prompt=system_prompt)
