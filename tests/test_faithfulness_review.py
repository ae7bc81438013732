"""Faithfulness review against the official DeepSeek-VL2 code (github deepseek-ai/DeepSeek-VL2, transformers 4.38.2).

Every expected value below was recorded from the official implementation, run unmodified in its own environment
(torch 2.14.1, transformers 4.38.2, CPU, float32, one thread) on the golden random-weight checkpoints and images:
`DeepseekVLV2Processor.from_pretrained(checkpoints/vl2-tiny-random)` for the processor and template values,
`DeepseekVLV2ForCausalLM.from_pretrained(..., torch_dtype=torch.float32)` for the sampled tokens.
"""

from __future__ import annotations

import pytest
import torch

from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.models.conversation import get_conv_template
from deepseek_vl.utils.io import load_pil_images
from golden import GOLDEN, checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
TINY = checkpoint("tiny")
IMAGES = GOLDEN / "images"

# An answer with every grounding tag and the eos, as the model writes it
# (official tokenizer.encode(answer, add_special_tokens=False)).
ANSWER_IDS = [
    128816, 671, 94656, 51394, 509, 270, 1559, 128817, 128818, 22663, 23243, 14, 223, 18, 14, 223, 8834, 14, 223,
    28307, 11621, 128819, 128820, 40895, 1122, 15463, 20479, 1,
]  # fmt: skip


@pytest.fixture(scope="module")
def processor() -> DeepseekVLV2Processor:
    return DeepseekVLV2Processor.from_pretrained(TINY)


@pytest.fixture(scope="module")
def model() -> DeepseekVLV2ForCausalLM:
    return DeepseekVLV2ForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()


def test_processor_decode_is_the_official_method(processor) -> None:
    """`processor.decode(ids, **kwargs)` exists in the official processor (tokenizer.decode); it was missing here."""
    text = "<|ref|>The giraffe at the back<|/ref|><|det|>[[580, 0, 999, 997]]<|/det|><|grounding|>两只长颈鹿"
    assert processor.tokenizer.encode(text + "<｜end▁of▁sentence｜>", add_special_tokens=False) == ANSWER_IDS
    # official: processor.decode(ids) and processor.decode(ids, skip_special_tokens=True)
    assert processor.decode(ANSWER_IDS) == text + "<｜end▁of▁sentence｜>"
    plain = "The giraffe at the back[[580, 0, 999, 997]]两只长颈鹿"
    assert processor.decode(ANSWER_IDS, skip_special_tokens=True) == plain
    assert processor.decode(torch.tensor(ANSWER_IDS), skip_special_tokens=False) == text + "<｜end▁of▁sentence｜>"


def test_conversation_update_last_message_and_offset() -> None:
    """The official Conversation API the official web demo uses: `offset` and `update_last_message`."""
    conv = get_conv_template("deepseek")
    assert conv.offset == 0
    conv.set_system_message("SYS")
    conv.append_message(conv.roles[0], "Hello!")
    conv.append_message(conv.roles[1], "Hi! This is Tony.")
    conv.append_message(conv.roles[0], "Who are you?")
    conv.append_message(conv.roles[1], None)
    # official get_prompt() before and after update_last_message("I am DeepSeek.")
    before = (
        "SYS\n\n<|User|>: Hello!\n\n<|Assistant|>: Hi! This is Tony.<｜end▁of▁sentence｜>"
        "<|User|>: Who are you?\n\n<|Assistant|>:"
    )
    assert conv.get_prompt() == before
    conv.update_last_message("I am DeepSeek.")
    assert conv.get_prompt() == before + " I am DeepSeek.<｜end▁of▁sentence｜>"
    assert conv.messages[-1] == ("<|Assistant|>", "I am DeepSeek.")
    assert get_conv_template("deepseek").messages == []  # the registry's template is untouched


GROUNDING = [
    {"role": "<|User|>", "content": "<image>\n<|ref|>The giraffe at the back.<|/ref|>.",
     "images": [str(IMAGES / "visual_grounding_1.jpeg")]},
    {"role": "<|Assistant|>", "content": ""},
]  # fmt: skip
CARD = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 1, "use_cache": True}
INFERENCE_PY = {"do_sample": True, "temperature": 0.4, "top_p": 0.9, "repetition_penalty": 1.1}

# Official tokens, torch.manual_seed(0) right before generate.
OFFICIAL_SAMPLED_GROUNDING = [
    96003, 5095, 56007, 57738, 65037, 124835, 86699, 65173, 120495, 63602, 88182, 61289, 44090, 97384, 95383, 83442,
    119386, 47129, 125754, 106564, 99051, 42019, 102899, 120946,
]  # fmt: skip
OFFICIAL_SAMPLED_BATCH = [
    [45863, 53936, 91450, 55785, 122221, 32871, 38533, 73593, 74946, 43430, 46857, 113061, 61283, 103144, 38856,
     113861, 43989, 63602, 69020, 120358, 46846, 104042, 63348, 77664],
    [86699, 111537, 116500, 61289, 18900, 94425, 60102, 12692, 45559, 71819, 107788, 73854, 80028, 59076, 69979, 69770,
     63294, 96641, 73702, 118832, 5095, 93352, 86812, 90252],
    [86699, 65429, 39860, 107197, 48205, 91482, 50390, 55087, 19081, 108871, 32185, 75688, 2729, 15662, 73854, 80028,
     27865, 18900, 84496, 118889, 127021, 15488, 46469, 57378],
]  # fmt: skip


def test_sampled_tokens_of_the_model_card_call_equal_the_official(processor, model) -> None:
    """`language.generate(inputs_embeds=...)` with inference.py's sampling settings draws the official tokens."""
    inputs = processor(conversations=GROUNDING, images=load_pil_images(GROUNDING), force_batchify=True)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        torch.manual_seed(0)
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask, max_new_tokens=24, **CARD, **INFERENCE_PY
        )
    assert out[0].tolist() == OFFICIAL_SAMPLED_GROUNDING


def test_sampled_tokens_of_a_mixed_batch_equal_the_official(processor, model) -> None:
    """Rows with 0, 1 and 3 images, left-padded (official process_one + batchify, images_seq_mask as bool), sampled
    with temperature, top-k, top-p and a repetition penalty."""
    names = [[], ["multi_image_2.jpeg"], ["multi_image_1.jpeg", "multi_image_2.jpeg", "multi_image_3.jpeg"]]
    texts = [
        "Tell me a story about the sea.",
        "<image>\nDescribe this image.",
        "This is image_1: <image>\nThis is image_2: <image>\nThis is image_3: <image>\n What is common?",
    ]
    conversations = []
    for text, files in zip(texts, names):
        user = {"role": "<|User|>", "content": text}
        if files:
            user["images"] = [str(IMAGES / name) for name in files]
        conversations.append([user, {"role": "<|Assistant|>", "content": ""}])
    inputs = processor.batchify([processor.process_one(conversations=conv) for conv in conversations])
    options = {"do_sample": True, "temperature": 0.9, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.3}
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        torch.manual_seed(0)
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=inputs.attention_mask, max_new_tokens=24, **CARD, **options
        )
    assert out.tolist() == OFFICIAL_SAMPLED_BATCH


def test_incremental_prefilling_then_sampling_equals_the_official(processor, model) -> None:
    """The official README's incremental-prefilling call (chunk_size 100) with inference.py's sampling settings."""
    inputs = processor(conversations=GROUNDING, images=load_pil_images(GROUNDING), force_batchify=True)
    with torch.no_grad():
        embeds, cache = model.incremental_prefilling(
            input_ids=inputs.input_ids, images=inputs.images, images_seq_mask=inputs.images_seq_mask,
            images_spatial_crop=inputs.images_spatial_crop, attention_mask=inputs.attention_mask, chunk_size=100,
        )  # fmt: skip
        torch.manual_seed(0)
        out = model.generate(
            inputs_embeds=embeds, input_ids=inputs.input_ids, images=inputs.images,
            images_seq_mask=inputs.images_seq_mask, images_spatial_crop=inputs.images_spatial_crop,
            attention_mask=inputs.attention_mask, past_key_values=cache, max_new_tokens=16, **CARD, **INFERENCE_PY,
        )  # fmt: skip
    prompt = inputs.input_ids.shape[1]
    assert torch.equal(out[:, :prompt], inputs.input_ids)
    assert out[0, prompt:].tolist() == OFFICIAL_SAMPLED_GROUNDING[:16]


# The official rotary tables after `model.to(dtype)` (the model card's way to run in bf16), at positions 257, 1446 and
# 4095, first half of the dims (the second repeats it): recorded from the official DeepseekV2RotaryEmbedding (MLA:
# Small, Base) and transformers 4.38.2's LlamaRotaryEmbedding (MHA: Tiny), dim 8 as in the golden checkpoints,
# base 10000, each built in fp32 and cast with `.to(dtype)`, then called as the official attention calls them.
OFFICIAL_ROTARY_AFTER_TO = {
    ("small", torch.bfloat16): (
        [[-0.039794921875, 0.8828125, -0.8359375, 0.96875], [-0.9609375, 0.8828125, -0.35546875, 0.125],
         [0.8046875, -0.022216796875, -0.98828125, -0.578125]],
        [[-1.0, 0.47265625, 0.546875, 0.25390625], [0.271484375, 0.466796875, 0.93359375, 0.9921875],
         [-0.59375, 1.0, -0.158203125, -0.81640625]],
    ),
    ("tiny", torch.bfloat16): (
        [[0.8203125, 0.828125, -0.84375, 0.96875], [0.6484375, 0.97265625, -0.330078125, 0.125],
         [-0.06591796875, 0.07763671875, -0.98828125, -0.58203125]],
        [[-0.57421875, 0.55859375, 0.5390625, 0.25390625], [0.76171875, 0.2255859375, 0.9453125, 0.9921875],
         [-0.99609375, 0.99609375, -0.1484375, -0.8125]],
    ),
    ("small", torch.float16): (
        [[0.8193359375, 0.85009765625, -0.84130859375, 0.96728515625],
         [0.64697265625, 0.99365234375, -0.318115234375, 0.12420654296875],
         [0.80419921875, 0.4599609375, -0.99169921875, -0.57666015625]],
        [[-0.5732421875, 0.52685546875, 0.54052734375, 0.254150390625],
         [0.7626953125, 0.11151123046875, 0.9482421875, 0.9921875],
         [-0.5947265625, 0.88818359375, -0.127685546875, -0.81689453125]],
    ),
    ("tiny", torch.float16): (
        [[0.8193359375, 0.8466796875, -0.84130859375, 0.96728515625],
         [0.64697265625, 0.99853515625, -0.320068359375, 0.1239013671875],
         [-0.06597900390625, 0.54638671875, -0.9931640625, -0.57763671875]],
        [[-0.5732421875, 0.5322265625, 0.54052734375, 0.25439453125],
         [0.7626953125, 0.051422119140625, 0.947265625, 0.9921875],
         [-0.998046875, 0.837890625, -0.1177978515625, -0.81640625]],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("variant", "dtype"), list(OFFICIAL_ROTARY_AFTER_TO))
def test_rotary_after_model_to_dtype_is_the_official_one(variant: str, dtype: torch.dtype) -> None:
    """`model.to(dtype)` casts the official fp32 `inv_freq` buffer: the MLA table is then built in that dtype,
    positions included (1446 -> 1448 in bf16), the MHA one from rounded frequencies. Loading straight into the dtype
    keeps the official buffer in fp32: those tables are the exact ones, cast."""
    positions = torch.tensor([[257, 1446, 4095]])
    expected_cos, expected_sin = (torch.tensor(table) for table in OFFICIAL_ROTARY_AFTER_TO[variant, dtype])
    cast = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant), dtype=torch.float32).to(dtype)
    cos, sin = cast.language.model.rotary_emb(positions, dtype)
    assert torch.equal(cos[0, :, :4].float(), expected_cos) and torch.equal(sin[0, :, :4].float(), expected_sin)
    assert torch.equal(cos[..., :4], cos[..., 4:])

    loaded = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant), dtype=dtype)
    exact_cos, exact_sin = loaded.language.model.rotary_emb(positions, dtype)
    fp32_cos, fp32_sin = loaded.language.model.rotary_emb(positions, torch.float32)
    assert torch.equal(exact_cos, fp32_cos.to(dtype)) and torch.equal(exact_sin, fp32_sin.to(dtype))
    assert not torch.equal(exact_cos[0, :, :4].float(), expected_cos)
    # back to fp32 after the cast: the official buffer keeps its rounded values, the positions are exact again
    cos32, _ = cast.float().language.model.rotary_emb(positions, torch.float32)
    assert cos32.dtype == torch.float32 and not torch.equal(cos32, fp32_cos)
