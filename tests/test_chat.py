"""VLChat on the golden checkpoints: it must give the official tokens, alone and batched, and stream, stop and
validate without changing them."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek_vl.chat import (
    ChatResult,
    ChatStream,
    GenerationOptions,
    ModelLoadError,
    VLChat,
    build_conversation,
    resolve_dtype,
    resolve_model_folder,
)
from deepseek_vl.models import DeepseekVLV2ForCausalLM
from golden import GOLDEN, VARIANTS, checkpoint, model_case, processor_case

IMAGES = GOLDEN / "images"
GIRAFFES = str(IMAGES / "visual_grounding_1.jpeg")
VEGETABLES = str(IMAGES / "multi_image_1.jpeg")


def golden_conversation(case: str, sample: int = 0) -> list[dict]:
    """A processor golden's conversation with image file names turned into paths."""
    messages = processor_case(case)[0]["inputs"]["samples"][sample]["conversation"]
    return [{**m, "images": [str(IMAGES / name) for name in m.get("images", [])]} for m in messages]


def grounding_question() -> list[dict]:
    """Case 01 as a user would write it: plain role, no <image> tag."""
    return [{"role": "user", "content": "<|ref|>The giraffe at the back.<|/ref|>.", "images": [GIRAFFES]}]


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_chat_gives_official_tokens(pipe_for, variant: str) -> None:
    result = pipe_for(variant).chat(golden_conversation("01_single_image_grounding"), max_new_tokens=12)
    assert result.token_ids == model_case(variant, "01_single_image_grounding")[1]["generated_ids"][0].tolist()
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (1446, 12, "length")


def test_image_tag_is_prepended_when_missing(tiny: VLChat) -> None:
    conversation, images = build_conversation(grounding_question(), None, None, exif_transpose=False)
    assert conversation[0]["content"] == "<image>\n<|ref|>The giraffe at the back.<|/ref|>."
    assert conversation[-1] == {"role": "<|Assistant|>", "content": ""} and len(images) == 1
    sample = tiny.processor.process_one(conversations=conversation, images=images)
    assert torch.equal(sample.input_ids, processor_case("01_single_image_grounding")[1]["input_ids"][0])
    assert tiny.count_prompt_tokens(grounding_question()) == 1446
    assert (
        tiny.chat(grounding_question(), max_new_tokens=12).token_ids
        == tiny.chat(golden_conversation("01_single_image_grounding"), max_new_tokens=12).token_ids
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_equals_official_batch_and_single_runs(pipe_for, variant: str) -> None:
    pipe = pipe_for(variant)
    conversations = [golden_conversation("10_batch_three", i) for i in range(3)]
    batch = pipe.chat_batch(conversations, max_new_tokens=12)
    expected = model_case(variant, "10_batch_three")[1]["generated_ids"].tolist()
    assert [result.token_ids for result in batch] == expected
    singles = [pipe.chat(conversation, max_new_tokens=12) for conversation in conversations]
    assert [r.token_ids for r in singles] == [r.token_ids for r in batch]
    assert [r.text for r in singles] == [r.text for r in batch]
    assert [r.prompt_tokens for r in batch] == processor_case("10_batch_three")[0]["outputs"]["seq_lens"]


def test_chunked_prefill_gives_the_same_tokens(tiny: VLChat) -> None:
    expected = model_case("tiny", "01_single_image_grounding")[1]["incremental_generated_ids"][0].tolist()
    assert tiny.chat(grounding_question(), max_new_tokens=12, chunk_size=128).token_ids == expected
    conversations = [golden_conversation("10_batch_three", i) for i in range(3)]
    chunked = tiny.chat_batch(conversations, max_new_tokens=6, chunk_size=500)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in tiny.chat_batch(conversations, max_new_tokens=6)]


def test_stream_pieces_join_to_the_answer(tiny: VLChat) -> None:
    plain = tiny.chat(grounding_question(), max_new_tokens=30)
    stream = tiny.chat(grounding_question(), max_new_tokens=30, stream=True)
    assert isinstance(stream, ChatStream)
    pieces = list(stream)
    assert len(pieces) > 5 and "".join(pieces) == stream.result.text == plain.text
    assert stream.result.token_ids == plain.token_ids


def test_closing_a_stream_stops_generation(tiny: VLChat) -> None:
    stream = tiny.chat(grounding_question(), max_new_tokens=200, stream=True)
    pieces = []
    for piece in stream:
        pieces.append(piece)
        if len(pieces) == 2:
            break
    stream.close()
    assert not stream._thread.is_alive()
    assert stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens < 100


def test_stop_strings_cut_the_answer(tiny: VLChat) -> None:
    full = tiny.chat(grounding_question(), max_new_tokens=30).text
    stop = full[len(full) // 2 : len(full) // 2 + 5]  # usually spans two tokens
    expected = full[: full.find(stop)].strip()
    result = tiny.chat(grounding_question(), max_new_tokens=30, stop=["never appears", stop])
    assert (result.text, result.finish_reason) == (expected, "stop")
    assert result.completion_tokens < 30
    stream = tiny.chat(grounding_question(), max_new_tokens=30, stop=stop, stream=True)
    assert "".join(stream) == stream.result.text == expected


def test_stop_strings_apply_per_row_in_a_batch(tiny: VLChat) -> None:
    conversations = [grounding_question(), [{"role": "user", "content": "Write a short poem about the sea."}]]
    full = tiny.chat_batch(conversations, max_new_tokens=20)
    stop = full[0].text[10:14]
    batch = tiny.chat_batch(conversations, max_new_tokens=20, stop=stop)
    singles = [tiny.chat(conversation, max_new_tokens=20, stop=stop) for conversation in conversations]
    assert [(r.text, r.completion_tokens, r.finish_reason) for r in batch] == [
        (r.text, r.completion_tokens, r.finish_reason) for r in singles
    ]
    assert batch[0].finish_reason == "stop" and batch[0].completion_tokens < 20


def test_seed_makes_sampling_reproducible(tiny: VLChat) -> None:
    def sample(seed: int) -> list[int]:
        return tiny.chat(grounding_question(), max_new_tokens=10, temperature=0.7, top_p=0.9, seed=seed).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_system_prompt_reaches_the_model_tokens(tiny: VLChat) -> None:
    """system_prompt= gives the ids of the official leading system message (golden case 12)."""
    conversation, images = build_conversation(
        [{"role": "user", "content": "Write one line about rain."}], None, "You are a poet.", exif_transpose=False
    )
    ids = tiny.processor.process_one(conversations=conversation, images=images).input_ids
    assert torch.equal(ids, processor_case("12_system_role_message")[1]["input_ids"][0])
    system_ids = tiny.tokenizer.encode("You are a poet.", add_special_tokens=False)
    assert ids[1 : 1 + len(system_ids)].tolist() == system_ids
    messages = [{"role": "user", "content": "Write one line about rain."}]
    with_system = tiny.chat(messages, system_prompt="You are a poet.", max_new_tokens=2)
    assert with_system.prompt_tokens == tiny.count_prompt_tokens(messages) + len(system_ids) == 16


def test_multi_turn_images_stay_in_their_turns(tiny: VLChat) -> None:
    official = [
        {"role": "<|User|>", "content": "<image>\nWhat is this?", "images": [VEGETABLES]},
        {"role": "<|Assistant|>", "content": "Vegetables."},
        {"role": "<|User|>", "content": "And here? <image>", "images": [GIRAFFES]},
        {"role": "<|Assistant|>", "content": ""},
    ]
    expected = tiny.processor(conversations=official)
    variants = [
        [  # per-message images; the first turn has no tag, so one is prepended there
            {"role": "user", "content": "What is this?", "images": [VEGETABLES]},
            {"role": "assistant", "content": "Vegetables."},
            {"role": "user", "content": "And here? <image>", "images": [GIRAFFES]},
        ],
        [{k: v for k, v in m.items() if k != "images"} for m in official],  # tags, and a flat images=
    ]
    for index, messages in enumerate(variants):
        images = [VEGETABLES, GIRAFFES] if index == 1 else None
        conversation, pil_images = build_conversation(messages, images, None, exif_transpose=False)
        sample = tiny.processor.process_one(conversations=conversation, images=pil_images)
        assert torch.equal(sample.input_ids, expected.input_ids[0]), index
        assert torch.equal(sample.images, expected.images[0]), index
    result = tiny.chat(variants[1], [VEGETABLES, GIRAFFES], max_new_tokens=3)
    assert result.prompt_tokens == expected.input_ids.shape[1]


def test_images_as_pil_numpy_and_data_url(tiny: VLChat) -> None:
    pil = Image.open(GIRAFFES).convert("RGB")
    data_url = "data:image/jpeg;base64," + base64.b64encode(Path(GIRAFFES).read_bytes()).decode()
    reference = tiny.chat(grounding_question(), max_new_tokens=4).token_ids
    for source in (pil, np.asarray(pil), data_url, f"file://{GIRAFFES}"):
        messages = [{"role": "user", "content": "<|ref|>The giraffe at the back.<|/ref|>.", "images": [source]}]
        assert tiny.chat(messages, max_new_tokens=4).token_ids == reference


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop": {"ok": 1}}, "stop"),
        ({"seed": -1}, "seed"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_options_are_clear_errors(tiny: VLChat, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny.chat([{"role": "user", "content": "Hi"}], **options)


@pytest.mark.parametrize(
    ("messages", "images", "message"),
    [
        ([], None, "non-empty list"),
        ([{"role": "robot", "content": "Hi"}], None, "unknown role"),
        ([{"role": "user"}], None, "string 'content'"),
        ([{"role": "user", "content": "Hi", "images": [GIRAFFES]}], [GIRAFFES], "not both"),
        ([{"role": "user", "content": "<image> <image>", "images": [GIRAFFES]}], None, "2 <image> tags but 1"),
        ([{"role": "user", "content": "<image>"}], [GIRAFFES, GIRAFFES], "1 <image> tags but 2"),
        ([{"role": "assistant", "content": "Hi", "images": [GIRAFFES]}], None, "only user messages"),
        ([{"role": "user", "content": "Hi", "images": GIRAFFES}], None, "must be a list"),
        ([{"role": "user", "content": "Hi"}], GIRAFFES, "wrap a single image"),
        ([{"role": "user", "content": "Hi", "image": GIRAFFES}], None, "unknown key 'image'"),
        ([{"role": "system", "content": "Be brief."}], None, "need a user message"),
    ],
)
def test_invalid_messages_are_clear_errors(tiny: VLChat, messages: list, images: list | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny.chat(messages, images)


def test_prompt_longer_than_the_context_is_an_error_also_when_streaming(tiny: VLChat) -> None:
    messages = [{"role": "user", "content": "rain " * 5000}]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        tiny.chat(messages, max_new_tokens=2)
    stream = tiny.chat(messages, max_new_tokens=2, stream=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        list(stream)
    assert stream.result is None


def test_system_prompt_twice_is_an_error(tiny: VLChat) -> None:
    messages = [{"role": "system", "content": "A"}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="system"):
        tiny.chat(messages, system_prompt="B")


def test_answer_post_processing_keeps_boxes(tiny: VLChat, monkeypatch) -> None:
    """A scripted model answer: markup kept, other special tokens dropped, boxes in pixels of the last image."""
    answer = "<|ref|>The giraffe<|/ref|><|det|>[[100, 200, 499, 999]]<|/det|>"
    tokens = tiny.tokenizer.encode(answer, add_special_tokens=False) + [128821, tiny.tokenizer.eos_token_id]

    def scripted_generate(input_ids, streamer=None, max_new_tokens=512, **kwargs):
        new = tokens[:max_new_tokens]
        if streamer is not None:
            streamer.put(input_ids.cpu())
            for token in new:
                streamer.put(torch.tensor([token]))
        return torch.cat([input_ids, torch.tensor([new])], dim=1)

    monkeypatch.setattr(tiny.model, "generate", scripted_generate)
    messages = [
        {"role": "user", "content": "Describe.", "images": [VEGETABLES]},
        {"role": "assistant", "content": "Vegetables."},
        {"role": "user", "content": "<|ref|>The giraffe<|/ref|>", "images": [GIRAFFES]},
    ]
    result = tiny.chat(messages)
    assert (result.text, result.finish_reason, result.completion_tokens) == (answer, "stop", len(tokens))
    (box,) = result.grounding.boxes
    assert box.label == "The giraffe" and box.box == (100, 200, 499, 999) and box.image_index == 1  # the 2nd image
    assert box.pixels == pytest.approx((100 / 999 * 724, 200 / 999 * 1086, 499 / 999 * 724, 1086))
    assert json.loads(json.dumps(result.to_dict()))["boxes"][0]["box"] == [100, 200, 499, 999]
    stream = tiny.chat(messages, stream=True)
    assert "".join(stream) == answer and stream.result.text == answer
    assert tiny.chat(messages, max_new_tokens=5).finish_reason == "length"


def test_result_to_dict_is_json(tiny: VLChat) -> None:
    result = tiny.chat(grounding_question(), max_new_tokens=3)
    assert isinstance(result, ChatResult)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) == {"text", "boxes", "prompt_tokens", "completion_tokens", "finish_reason"}


def test_streams_from_several_threads_are_serialised(tiny: VLChat) -> None:
    reference = tiny.chat(grounding_question(), max_new_tokens=6).token_ids
    results: list[ChatResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.chat(grounding_question(), max_new_tokens=6)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.token_ids for r in results] == [reference, reference]


def test_from_pretrained_loads_a_folder() -> None:
    pipe = VLChat.from_pretrained(checkpoint("tiny"), device="cpu", dtype="bfloat16", progress=False)
    assert pipe.model.dtype == torch.bfloat16 and not pipe.model.training
    assert pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2).completion_tokens == 2


def test_loading_errors_say_what_to_do(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="neither a checkpoint folder"):
        resolve_model_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_a_wrong_adapter_folder_is_an_error_before_the_model_loads(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter folder was checked")

    monkeypatch.setattr(DeepseekVLV2ForCausalLM, "from_pretrained", never)
    with pytest.raises(FileNotFoundError, match="is not a LoRA adapter folder"):
        VLChat.from_pretrained(checkpoint("tiny"), adapter="/no/such/adapter", progress=False)


def test_generation_options_map_to_generate_arguments() -> None:
    assert GenerationOptions().generate_kwargs() == {"max_new_tokens": 512, "do_sample": False}
    sampled = GenerationOptions(temperature=0.7, top_p=0.9, repetition_penalty=1.1, stop="x").generate_kwargs()
    assert sampled == {
        "max_new_tokens": 512, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1
    }  # fmt: skip
