"""transformers conventions of the processor: AutoProcessor finds it, and apply_chat_template turns OpenAI /
transformers content-part messages into the official prompt of every conversation golden, tokens included."""

from __future__ import annotations

import pytest
import torch

from deepseek_vl.models import DeepseekVLV2Processor
from golden import GOLDEN, checkpoint, processor_case

TINY = checkpoint("tiny")
CONVERSATION_CASES = [
    "01_single_image_grounding", "02_three_images_no_tiling", "03_two_images_tiling", "04_multi_turn",
    "05_system_prompt", "06_text_only", "08_training_mode", "11_grounded_captioning", "12_system_role_message",
]  # fmt: skip
ROLES = {"<|User|>": "user", "<|Assistant|>": "assistant", "system": "system"}


@pytest.fixture(scope="module")
def processor() -> DeepseekVLV2Processor:
    return DeepseekVLV2Processor.from_pretrained(TINY)


def content_parts(text: str, images: list[str], with_sources: bool) -> list[dict]:
    """The official '<image>\\n'-tagged content as transformers content parts."""
    *pieces, last = text.split("<image>\n")
    parts: list[dict] = []
    for piece, image in zip(pieces, images):
        if piece:
            parts.append({"type": "text", "text": piece})
        parts.append({"type": "image", "path": str(GOLDEN / "images" / image)} if with_sources else {"type": "image"})
    return parts + ([{"type": "text", "text": last}] if last else [])


def as_messages(conversation: list[dict], with_sources: bool = False) -> list[dict]:
    return [
        {"role": ROLES[m["role"]], "content": content_parts(m["content"], m.get("images", []), with_sources)}
        for m in conversation
    ]


def test_auto_processor_finds_it() -> None:
    from transformers import AutoProcessor

    loaded = AutoProcessor.from_pretrained(TINY, trust_remote_code=True)
    assert type(loaded) is DeepseekVLV2Processor
    assert loaded.candidate_resolutions == DeepseekVLV2Processor.from_pretrained(TINY).candidate_resolutions


@pytest.mark.parametrize("case", CONVERSATION_CASES)
def test_chat_template_gives_the_official_prompt(processor: DeepseekVLV2Processor, case: str) -> None:
    info, _ = processor_case(case)
    sample = info["inputs"]["samples"][0]
    messages = as_messages(sample["conversation"])
    prompt = processor.apply_chat_template(messages, system_prompt=sample["system_prompt"])
    assert prompt == info["outputs"]["sft_format"][0]
    if messages[-1] == {"role": "assistant", "content": []}:  # the open turn, written by add_generation_prompt
        assert processor.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                             system_prompt=sample["system_prompt"]) == prompt  # fmt: skip


def test_openai_image_url_parts_and_string_content(processor: DeepseekVLV2Processor) -> None:
    info, _ = processor_case("01_single_image_grounding")
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.jpg"}},
                                     {"type": "text", "text": "<|ref|>The giraffe at the back.<|/ref|>."}]},
    ]  # fmt: skip
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == info["outputs"]["sft_format"][0]
    text = [{"role": "user", "content": "<image>\n<|ref|>The giraffe at the back.<|/ref|>."}]
    assert processor.apply_chat_template(text, add_generation_prompt=True) == info["outputs"]["sft_format"][0]


@pytest.mark.parametrize("case", ["03_two_images_tiling", "04_multi_turn"])
def test_tokenized_template_equals_the_official_inputs(processor: DeepseekVLV2Processor, case: str) -> None:
    info, tensors = processor_case(case)
    sample = info["inputs"]["samples"][0]
    batch = processor.apply_chat_template(as_messages(sample["conversation"], with_sources=True), tokenize=True)
    assert torch.equal(batch.input_ids, tensors["input_ids"])
    assert torch.equal(batch.images_spatial_crop, tensors["images_spatial_crop"])
    assert batch.images.shape == tuple(tensors["images_shape"].tolist())


def test_bad_parts_are_explained(processor: DeepseekVLV2Processor) -> None:
    with pytest.raises(ValueError, match="content part"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(ValueError, match="unknown role"):
        processor.apply_chat_template([{"role": "robot", "content": "hi"}])
    with pytest.raises(ValueError, match="carry its image"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True,
                                      add_generation_prompt=True)  # fmt: skip
