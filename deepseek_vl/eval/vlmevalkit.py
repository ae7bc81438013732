"""A VLMEvalKit-compatible model class: `generate(message, dataset)` on this package instead of the official one.

VLMEvalKit (open-compass/VLMEvalKit) calls a model with a list of `{"type": "image" | "text", "value": ...}` parts
(or a list of `{"role", "content": [parts]}` turns) and reads back a string. This class builds the conversation
exactly as VLMEvalKit's own DeepSeek-VL2 wrapper does (so scores compare with the published ones): an `<image>`
tag and a line break per image, in order; for MMMU_DEV_VAL the `<image>` tags first with `<image k>` placeholders,
the letter instruction, and the first image enlarged 2x. Register it in VLMEvalKit's `supported_VLM`:

    from functools import partial
    from deepseek_vl.eval.vlmevalkit import DeepSeekVL2
    supported_VLM["deepseek_vl2_tiny_here"] = partial(DeepSeekVL2, model_path="deepseek-ai/deepseek-vl2-tiny")
"""

from __future__ import annotations

from typing import Any

from PIL import Image

__all__ = ["DeepSeekVL2"]

MMMU = "MMMU_DEV_VAL"
_MMMU_INSTRUCTION = "Answer with the option's letter from the given choices directly. Answer the question using a " \
                    "single word or phrase.\n"  # fmt: skip
_ROLES = {"user": "user", "assistant": "assistant"}


class DeepSeekVL2:
    """VLMEvalKit's model interface: INTERLEAVE (images anywhere in the text), `generate`, `chat`."""

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str = "deepseek-ai/deepseek-vl2-tiny", device: str = "auto", dtype: str = "auto",
                 **generation: Any) -> None:  # fmt: skip
        from deepseek_vl.chat import VLChat

        self.pipe = VLChat.from_pretrained(model_path, device=device, dtype=dtype, progress=False)
        self.generation = {"max_new_tokens": 512} | generation  # greedy, as VLMEvalKit's wrapper

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False  # the dataset's own prompt, edited for MMMU below, as in VLMEvalKit

    def generate(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        turns = message if message and "role" in message[0] else [{"role": "user", "content": message}]
        messages, images = [], []
        for turn in turns:
            text, turn_images = _render(turn["content"], dataset)
            messages.append({"role": _ROLES[turn["role"]], "content": text})
            images += turn_images
        loaded = [Image.open(path).convert("RGB") if isinstance(path, str) else path for path in images]
        if dataset == MMMU and loaded:
            first = loaded[0]
            loaded[0] = first.resize((2 * first.width, 2 * first.height), Image.BILINEAR)
        result = self.pipe.chat(messages, loaded, **self.generation)
        return result.text.rstrip(".")

    def chat(self, message: list[dict[str, Any]], dataset: str | None = None) -> str:
        return self.generate(message, dataset)


def _render(parts: list[dict[str, Any]], dataset: str | None) -> tuple[str, list]:
    images = [part["value"] for part in parts if part["type"] == "image"]
    if dataset != MMMU:
        text = "".join("<image>\n" if part["type"] == "image" else part["value"] for part in parts)
        return text, images
    text, index = "", 0
    for part in parts:
        if part["type"] == "image":
            index += 1
            text += f"<image {index}>"
        else:
            text += part["value"]
    text = text.replace("Please select the correct answer from the options above.", _MMMU_INSTRUCTION)
    text = text.replace("Question:", "").replace("Options:\n", "")
    return "<image>" * len(images) + "\n" + text, images
