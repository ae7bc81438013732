"""The Python API misused the way people do (the model card's calls with a piece wrong): a clear error naming the
fix, or the official behaviour, never an indexing error deep in torch or silently wrong output."""

from __future__ import annotations

import warnings

import pytest
import torch
from golden import checkpoint
from PIL import Image

from deepseek_vl.models import DeepseekVLV2ForCausalLM
from deepseek_vl.models.conversation import get_conv_template
from deepseek_vl.options import ModelLoadError

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
IMAGE = Image.new("RGB", (64, 48), "blue")
CONVERSATION = [{"role": USER, "content": "<image>\nDescribe."}, {"role": ASSISTANT, "content": ""}]
TEXT = [{"role": USER, "content": "Say hello."}, {"role": ASSISTANT, "content": ""}]
GREEDY = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 1, "eos_token_id": 1}


@pytest.fixture(scope="module")
def processor(tiny):
    return tiny.processor


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.model


@pytest.fixture(scope="module")
def inputs(processor):
    return processor(conversations=CONVERSATION, images=[IMAGE])


def test_unbatched_sample_names_force_batchify(processor, model) -> None:
    sample = processor(conversations=CONVERSATION, images=[IMAGE], force_batchify=False)
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, tokens\).*force_batchify=True"):
        model.prepare_inputs_embeds(**sample)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_ids": lambda t: t.float()}, "input_ids must be .* token ids, got a tensor of dtype float32"),
        ({"input_ids": lambda t: t.tolist()}, "input_ids must be .* got a list"),
        ({"images": lambda t: t[0]}, r"images must be float \(batch, tiles, 3, 384, 384\)"),
        ({"images": lambda t: t[..., :224, :224]}, r"images must be float .*shape \(1, 2, 3, 224, 224\)"),
        ({"images": lambda t: t.to(torch.uint8)}, "images must be float .* dtype uint8"),
        ({"images_spatial_crop": lambda t: t[0]}, r"images_spatial_crop must be \(batch, images, 2\)"),
        ({"images_seq_mask": lambda t: t[:, 3:]}, "images_seq_mask is .* input_ids"),
        ({"images_spatial_crop": lambda t: t * 3}, r"needs 10 tiles but images holds 2"),
        ({"images_spatial_crop": lambda t: None}, "images were given without images_seq_mask and images_spatial_crop"),
        ({"images": lambda t: None}, "images_seq_mask marks .* <image> positions but no images were given"),
        ({"images_spatial_crop": lambda t: t * 0}, "images_seq_mask marks .* positions but no images were given"),
        ({"input_ids": lambda t: t.to("meta")}, r"input_ids are on meta but the model is on cpu.*inputs.to\(model"),
        ({"images": lambda t: t.to("meta")}, "images are on meta but input_ids on cpu"),
    ],
)
def test_inputs_that_are_not_one_processor_batch(inputs, model, change: dict, message: str) -> None:
    """Before: TypeError/IndexError/RuntimeError from torch or timm, or the `<image>` placeholder embeddings used as
    if they were the image (images or crops missing)."""
    kwargs = {key: inputs[key] for key in ("input_ids", "images", "images_seq_mask", "images_spatial_crop")}
    kwargs.update({key: edit(kwargs[key]) for key, edit in change.items()})
    with pytest.raises(ValueError, match=message):
        model.prepare_inputs_embeds(**kwargs)


def test_int_images_seq_mask_and_bf16_images_work(inputs, model) -> None:
    """The official batchify's integer mask, and images cast by the official `.to(device)` default (bfloat16)."""
    reference = model.prepare_inputs_embeds(**inputs)
    int_mask = model.prepare_inputs_embeds(**{**dict(inputs.items()), "images_seq_mask": inputs.images_seq_mask.long()})
    assert torch.equal(int_mask, reference)
    bf16 = model.prepare_inputs_embeds(**{**dict(inputs.items()), "images": inputs.images.bfloat16()})
    assert bf16.dtype == reference.dtype and bf16.shape == reference.shape


def test_forward_without_inputs_and_with_mismatched_labels(inputs, model) -> None:
    with pytest.raises(ValueError, match="forward needs input_ids"):
        model()
    with pytest.raises(ValueError, match=r"labels must be int64 \(batch, tokens\) \(1, \d+\).*shape \(1, \d+\)"):
        model(**{**dict(inputs.items()), "labels": inputs.labels[:, 2:]})
    with pytest.raises(ValueError, match="labels must be int64 .* dtype int32"):
        model(**{**dict(inputs.items()), "labels": inputs.labels.int()})


def test_language_model_inputs_of_another_dtype_or_mask_length(inputs, model) -> None:
    """float32 embeddings into a bf16 model, a mask that does not cover the tokens: named, not a matmul error."""
    embeds = model.prepare_inputs_embeds(**inputs)
    with pytest.raises(ValueError, match=r"attention_mask \(or position_ids\) does not fit 1 rows of 0 cached"):
        model.language_model.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask[:, :5], **GREEDY)
    bf16 = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"inputs_embeds are torch.float32 but the model runs in torch.bfloat16"):
        bf16.language_model.generate(inputs_embeds=embeds, attention_mask=inputs.attention_mask, **GREEDY)


def test_processor_output_to_a_dtype_casts_only_the_images(processor) -> None:
    """`.to(torch.bfloat16)` raised torch's "invalid combination of arguments"; the ids must stay int64."""
    batch = processor(conversations=CONVERSATION, images=[IMAGE]).to(torch.bfloat16)
    assert batch.images.dtype == torch.bfloat16
    assert batch.input_ids.dtype == torch.long and batch.images_seq_mask.dtype == torch.bool


def test_incremental_prefilling_as_the_official_signature_and_with_the_whole_batch(processor, model) -> None:
    """The official signature takes inputs_embeds; `**inputs` carries sft_format/seq_lens/labels (both TypeErrors)."""
    batch = processor(conversations=TEXT)
    embeds = model.prepare_inputs_embeds(**batch)
    with torch.no_grad():
        from_ids, cache = model.incremental_prefilling(**batch, chunk_size=4)
        from_embeds, cache_from_embeds = model.incremental_prefilling(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, chunk_size=4
        )
    assert torch.equal(from_ids, from_embeds)
    assert cache.get_seq_length() == cache_from_embeds.get_seq_length() == batch.input_ids.shape[1] - 1
    assert torch.equal(cache.layers[0].keys, cache_from_embeds.layers[0].keys)
    with pytest.raises(TypeError, match="chunksize"):
        model.incremental_prefilling(**batch, chunksize=4)


def test_a_prefilled_cache_serves_several_answers(processor, model) -> None:
    """The official cache is a tuple that generate does not change; this one grows in place, so a second generate
    from it used to continue after the first answer (different tokens, silently)."""
    batch = processor(conversations=TEXT)
    keys = ("input_ids", "images", "images_seq_mask", "images_spatial_crop", "attention_mask")
    inputs = {key: batch[key] for key in keys}
    with torch.no_grad():
        expected = model.generate(**inputs, **GREEDY)
        embeds, cache = model.incremental_prefilling(**inputs, chunk_size=4)
        first = model.generate(inputs_embeds=embeds, **inputs, past_key_values=cache, **GREEDY)
        second = model.generate(inputs_embeds=embeds, **inputs, past_key_values=cache, **GREEDY)
        mask = inputs["attention_mask"]
        language = [model.language_model.generate(inputs_embeds=embeds, attention_mask=mask, cache=cache, **GREEDY)
                    for _ in range(2)]  # fmt: skip
    assert torch.equal(first, expected)
    assert torch.equal(second, expected)
    assert torch.equal(language[0], expected[:, embeds.shape[1] :]) and torch.equal(language[1], language[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"path": "nope/not/here"}, ModelLoadError, "is neither a checkpoint folder nor a Hub repo id"),
        ({"path": "config.json"}, ModelLoadError, "is neither a checkpoint folder"),
        ({"dtype": "bf16"}, ValueError, r"dtype='bf16' is not a dtype: pass torch.bfloat16"),
        ({"torch_dtype": "fp32"}, ValueError, r"torch_dtype='fp32' is not a dtype"),
        ({"attn_implementation": "flash_attention_2"}, ValueError, "not available.*'sdpa'.*'eager'"),
    ],
)
def test_loading_mistakes(tmp_path, kwargs: dict, error: type, message: str) -> None:
    """Before: transformers' "Repo id must be in the form 'repo_name'" for a missing folder, a dtype error listing
    nothing, and a request to ask for FlashAttention support on a hub page built from the local path."""
    path = kwargs.pop("path", None)
    source = checkpoint("tiny") if path is None else tmp_path / path
    if path == "config.json":
        source = checkpoint("tiny") / path
    with pytest.raises(error, match=message):
        DeepseekVLV2ForCausalLM.from_pretrained(source, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conversations": TEXT[0]}, "conversations must be a list of messages .* got dict"),
        ({"conversations": "Say hello."}, "conversations must be a list of messages .* got str"),
        ({"conversations": [{"role": USER, "content": None}, TEXT[1]]}, "Message 0 has NoneType content"),
        (
            {"conversations": [{"role": USER, "content": [{"type": "text", "text": "Hi"}]}, TEXT[1]]},
            "Message 0 has list content.*apply_chat_template",
        ),
        ({"conversations": [TEXT, TEXT[:1]]}, r"conversations\[1\]: With inference_mode=True"),
        ({"conversations": [TEXT, CONVERSATION], "images": [[], []]}, r"conversations\[1\]: The conversation has 1"),
        ({"conversations": TEXT, "system_prompt": None}, r"system_prompt must be a str \('' for none\)"),
        ({"prompt": "Hi", "apply_sft_format": True, "system_prompt": None}, "system_prompt must be a str"),
    ],
)
def test_conversation_mistakes(processor, kwargs: dict, message: str) -> None:
    """Before: KeyError 0 / AttributeError for a message or string, 'None' or a list's repr silently in the prompt
    (a None system_prompt too: the official template renders it as "None"), and batch errors that did not say which
    conversation."""
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_batchify_of_a_batch_or_dicts(processor) -> None:
    """Before: "object of type 'BatchCollateOutput' has no len()" and "'dict' object has no attribute 'images'"."""
    sample = processor.process_one(conversations=TEXT)
    with pytest.raises(ValueError, match="got a BatchCollateOutput; a processor.* call already returns a batch"):
        processor.batchify([processor(conversations=TEXT)])
    with pytest.raises(ValueError, match="batchify takes samples of process_one .* got a dict"):
        processor.batchify([dict(sample.items())])


def test_system_prompt_in_conversation_mode_warns_that_the_model_never_sees_it(processor) -> None:
    with pytest.warns(UserWarning, match=r"system_prompt= only shows in sft_format.*'role': 'system'"):
        batch = processor(conversations=TEXT, system_prompt="Answer briefly.")
    assert batch.sft_format[0].startswith("Answer briefly.")  # the official sft_format, ids unchanged
    assert torch.equal(batch.input_ids, processor(conversations=TEXT).input_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor(conversations=TEXT, system_prompt="")  # the model card's call


def test_decode_of_labels_and_batch_decode(processor) -> None:
    batch = processor(conversations=[TEXT, CONVERSATION], images=[[], [IMAGE]])
    with pytest.raises(ValueError, match=r"non-negative.*labels\[labels != -100\]"):
        processor.decode(batch.labels[1])  # -100 at the image tokens
    with pytest.raises(ValueError, match="got 'Hi'"):
        processor.decode("Hi")
    assert processor.batch_decode(batch.input_ids) == [processor.decode(row) for row in batch.input_ids]


def test_conversation_template_mistakes() -> None:
    conv = get_conv_template("deepseek")
    with pytest.raises(ValueError, match="no message yet"):
        conv.update_last_message("answer")
    conv.append_message(conv.roles[0], ("<image>\nDescribe.", ["a.png"]))  # the official web demo's history entry
    with pytest.raises(TypeError, match=r"message 0 \(<\|User\|>\) is a tuple, not text"):
        conv.get_prompt()


def test_chat_batch_of_one_conversation_names_the_fix(tiny) -> None:
    with pytest.raises(ValueError, match=r"list of conversations.*\[messages\].*chat\(messages\)"):
        tiny.chat_batch([{"role": "user", "content": "Hi"}], max_new_tokens=1)
