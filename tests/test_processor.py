"""DeepseekVLV2Processor against the official processor goldens (every case, bit for bit), plus API and errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from golden import GOLDEN, checkpoint, official_images, processor_case
from PIL import Image

from deepseek_vl.models.conversation import get_conv_template
from deepseek_vl.models.processing import (
    BatchCollateOutput,
    DeepseekVLV2Processor,
    select_best_resolution,
)
from deepseek_vl.utils.io import load_image, load_pil_images

CHECKPOINT = checkpoint("tiny")
CASES = sorted(path.stem for path in (GOLDEN / "processor").glob("*.json"))
MODEL_KEYS = {
    "sft_format", "input_ids", "labels", "attention_mask", "images_seq_mask", "images", "images_spatial_crop",
    "seq_lens",
}  # fmt: skip
USER, ASSISTANT = "<|User|>", "<|Assistant|>"


@pytest.fixture(scope="module")
def processor() -> DeepseekVLV2Processor:
    return DeepseekVLV2Processor.from_pretrained(CHECKPOINT)


def with_paths(conversation: list[dict]) -> list[dict]:
    """The goldens name images by file name inside images/."""
    return [{**m, "images": [str(GOLDEN / "images" / name) for name in m.get("images", [])]} for m in conversation]


def sample_kwargs(sample: dict) -> dict:
    kwargs = {"inference_mode": sample["inference_mode"], "system_prompt": sample["system_prompt"]}
    if "conversation" in sample:
        conversation = with_paths(sample["conversation"])
        return {**kwargs, "conversations": conversation, "images": load_pil_images(conversation)}
    images = [load_image(GOLDEN / "images" / name) for name in sample["images"]]
    return {**kwargs, "prompt": sample["prompt"], "images": images, "apply_sft_format": sample["apply_sft_format"]}


_RESULTS: dict[str, tuple[list, BatchCollateOutput]] = {}


def run_case(processor: DeepseekVLV2Processor, case: str):
    """The official call of the case: `processor(...)` ("call") or `process_one` + `batchify` ("batch")."""
    if case not in _RESULTS:
        inputs = processor_case(case)[0]["inputs"]
        samples = [processor.process_one(**sample_kwargs(sample)) for sample in inputs["samples"]]
        if inputs["mode"] == "call":
            batch = processor(**sample_kwargs(inputs["samples"][0]), force_batchify=True)
        else:
            batch = processor.batchify(samples)
        _RESULTS[case] = samples, batch
    return _RESULTS[case]


@pytest.mark.parametrize("case", CASES)
def test_batch_matches_golden(processor, case):
    info, expected = processor_case(case)
    outputs = info["outputs"]
    _, batch = run_case(processor, case)
    assert isinstance(batch, BatchCollateOutput)
    assert batch.sft_format == outputs["sft_format"]
    for key in ("input_ids", "labels", "images_spatial_crop"):
        assert batch[key].dtype == torch.int64, key
        assert torch.equal(batch[key], expected[key]), key
    assert batch.attention_mask.dtype == torch.bool and torch.equal(batch.attention_mask, expected["attention_mask"])
    # always bool, also where the official batchify returned int64 after padding
    assert batch.images_seq_mask.dtype == torch.bool
    assert torch.equal(batch.images_seq_mask, expected["images_seq_mask"].bool())
    assert list(batch.seq_lens) == expected["seq_lens"].tolist() == outputs["seq_lens"]


@pytest.mark.parametrize("case", CASES)
def test_images_bit_exact(processor, case):
    _, expected = processor_case(case)
    samples, batch = run_case(processor, case)
    assert batch.images.dtype == torch.float32
    assert list(batch.images.shape) == expected["images_shape"].tolist()
    assert torch.equal(batch.images, official_images(case))
    for sample, num_tiles in zip(samples, expected["num_tiles"].tolist()):
        assert sample.images.shape[0] == max(num_tiles, 1)
        if num_tiles == 0:
            assert not sample.images.any()


@pytest.mark.parametrize("case", CASES)
def test_per_sample_matches_golden(processor, case):
    info, expected = processor_case(case)
    samples, _ = run_case(processor, case)
    per_sample = info["outputs"]["per_sample"]
    assert len(samples) == len(per_sample)
    for i, (sample, ref) in enumerate(zip(samples, per_sample)):
        assert sample.sft_format == ref["sft_format"]
        assert len(sample) == ref["seq_len"]
        assert sample.input_ids.tolist() == ref["input_ids"]
        assert sample.target_ids.tolist() == ref["target_ids"]
        for key in ("input_ids", "target_ids", "images_seq_mask", "images_spatial_crop"):
            assert torch.equal(getattr(sample, key), expected[f"sample{i}.{key}"]), key
        assert sample.images_spatial_crop.tolist() == ref["images_spatial_crop"]
        assert sample.num_image_tokens == ref["num_image_tokens"] == expected[f"sample{i}.num_image_tokens"].tolist()
        assert sample.num_image_tokens == info["outputs"]["num_image_tokens"][i]
        assert sample.images_seq_mask.sum().item() == sum(ref["num_image_tokens"])


@pytest.mark.parametrize("case", CASES)
def test_best_resolution_matches_golden(processor, case):
    for ref in processor_case(case)[0]["outputs"]["per_sample"]:
        assert ref["cropping"] in (None, len(ref["images"]) <= 2)
        for name, best in zip(ref["images"], ref["best_resolution_wh"]):
            size = Image.open(GOLDEN / "images" / name).size
            chosen = select_best_resolution(size, processor.candidate_resolutions) if ref["cropping"] else (384, 384)
            assert list(chosen) == best


def test_select_best_resolution_prefers_less_waste_then_list_order():
    assert select_best_resolution((100, 100), [(768, 768), (384, 384)]) == (384, 384)  # same pixels, less waste
    assert select_best_resolution((384, 384), [(384, 384), (384, 384)]) == (384, 384)
    assert select_best_resolution((1000, 500), [(384, 384), (768, 384), (384, 768)]) == (768, 384)


def test_attributes(processor):
    assert (processor.image_token, processor.image_token_id) == ("<image>", 128815)
    assert (processor.bos_id, processor.eos_id, processor.pad_id) == (0, 1, 2)
    assert (processor.patch_size, processor.downsample_ratio, processor.image_size) == (14, 2, 384)
    assert (processor.ignore_id, processor.sft_format, processor.mask_prompt) == (-100, "deepseek", False)
    assert len(processor.candidate_resolutions) == 23 and processor.candidate_resolutions[0] == (384, 384)
    assert len(processor.tokenizer) == 128823


def test_conversation_template_system_role_shift():
    conv = get_conv_template("deepseek")
    for role, content in (("system", "Be brief."), (USER, "Hi"), (ASSISTANT, "")):
        conv.append_message(role, content)
    assert conv.get_prompt() == "system: Be brief.\n\n<|User|>: Hi<｜end▁of▁sentence｜><|Assistant|>:"
    assert get_conv_template("deepseek").messages == []  # the registry is not mutated
    with pytest.raises(ValueError, match="Unknown conversation template"):
        get_conv_template("vicuna")


def test_batch_of_conversations_reproduces_batch_three(processor):
    info, expected = processor_case("10_batch_three")
    conversations = [with_paths(sample["conversation"]) for sample in info["inputs"]["samples"]]
    _, reference = run_case(processor, "10_batch_three")
    loaded = processor(conversations=conversations)  # images=None: each conversation's "images" entries
    given = processor(conversations=conversations, images=[load_pil_images(conv) for conv in conversations])
    for batch in (loaded, given):
        assert batch.sft_format == info["outputs"]["sft_format"]
        for key in ("input_ids", "labels", "attention_mask", "images_spatial_crop"):
            assert torch.equal(batch[key], expected[key]), key
        assert torch.equal(batch.images_seq_mask, expected["images_seq_mask"].bool())
        assert torch.equal(batch.images, reference.images)
        assert list(batch.seq_lens) == [1446, 16, 1429]
    unbatched = processor(conversations=conversations, force_batchify=False)
    assert [len(sample) for sample in unbatched] == [1446, 16, 1429]


def test_single_conversation_image_forms(processor):
    info, expected = processor_case("01_single_image_grounding")
    conversation = with_paths(info["inputs"]["samples"][0]["conversation"])
    images = load_pil_images(conversation)
    for kwargs in ({}, {"conversations": [conversation]}, {"conversations": [conversation], "images": [images]}):
        batch = processor(**({"conversations": conversation} | kwargs))  # images=None loads the messages' images
        assert torch.equal(batch.input_ids, expected["input_ids"])
    batch = processor(conversations=[conversation], images=images)  # a flat list for a single conversation
    assert torch.equal(batch.images_spatial_crop, expected["images_spatial_crop"])
    text_only = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": ""}]
    assert processor(conversations=[text_only], images=[]).seq_lens == processor(conversations=text_only).seq_lens
    with pytest.raises(ValueError, match="prompt must be a str"):
        processor.process_one(prompt=["Hi"])


def test_prompt_without_images_is_text_only(processor):
    batch = processor(prompt="Translate 'good morning' into Spanish.", apply_sft_format=True)
    assert batch.images.shape == (1, 1, 3, 384, 384) and not batch.images.any()
    assert batch.images_spatial_crop.tolist() == [[[0, 0]]]
    assert batch.input_ids[0, 0].item() == processor.bos_id and batch.input_ids[0, -1].item() != processor.eos_id
    prompts = processor(prompt=["Hello", "A longer prompt here"])
    assert prompts.attention_mask.sum(1).tolist() == prompts.seq_lens and not prompts.attention_mask[0, 0]


def test_a_literal_pad_token_is_no_training_target(processor):
    """As the official batchify, which sets every label equal to pad_id to ignore_id (the fuzz against it found it)."""
    conversation = [{"role": "<|User|>", "content": "a"}, {"role": "<|Assistant|>", "content": "b <｜▁pad▁｜> c"}]
    batch = processor(conversations=conversation, images=[], inference_mode=False, force_batchify=True)
    pad = batch.input_ids[0] == processor.pad_id
    assert pad.sum() == 1 and batch.labels[0, pad].tolist() == [-100]
    assert (batch.labels[0, ~pad] == batch.input_ids[0, ~pad]).sum() > 0  # the answer's other tokens are targets


def test_deepseekapi_sys_is_a_system_role(processor):
    """The official processor also takes "deepseekapi-sys" as the leading system message."""

    def ids(role: str) -> list[int]:
        conversation = [
            {"role": role, "content": "Be brief."},
            {"role": USER, "content": "Hi"},
            {"role": ASSISTANT, "content": ""},
        ]
        return processor(conversations=conversation, images=[], force_batchify=True).input_ids[0].tolist()

    assert ids("deepseekapi-sys") == ids("system")


def test_right_padding(processor):
    samples, _ = run_case(processor, "10_batch_three")
    batch = processor.batchify(samples, padding="right")
    assert torch.equal(batch.input_ids[1, :16], samples[1].input_ids)
    assert (batch.input_ids[1, 16:] == processor.pad_id).all() and (batch.labels[1, 16:] == -100).all()
    assert batch.attention_mask[1].sum().item() == 16 and batch.attention_mask[1, :16].all()


def test_unpacking_and_to(processor):
    batch = processor(prompt="<image>Describe.", images=[Image.new("RGB", (40, 30), "red")])
    assert set(batch.keys()) == MODEL_KEYS
    assert set((lambda **kwargs: kwargs)(**batch)) == MODEL_KEYS
    assert batch["sft_format"] == ["<image>Describe."] and batch["attention_mask"] is batch.attention_mask
    assert "images" in batch and "pixel_values" not in batch
    with pytest.raises(KeyError, match="available keys"):
        batch["pixel_values"]
    moved = batch.to("cpu", dtype=torch.bfloat16)
    assert moved is batch
    assert batch.images.dtype == torch.bfloat16
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.bool
    assert batch.to(torch.device("meta")).input_ids.device.type == "meta"


def test_mask_prompt_override_and_save_roundtrip(processor, tmp_path):
    conversation = [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "Hello!"}]
    masked = DeepseekVLV2Processor.from_pretrained(CHECKPOINT, mask_prompt=True)
    sample = masked.process_one(conversations=conversation, inference_mode=False)
    answer = processor.encode("Hello!", bos=False, eos=True)
    assert sample.target_ids.tolist() == [processor.bos_id] + [-100] * (len(sample) - 1 - len(answer)) + answer
    assert processor.process_one(conversations=conversation, inference_mode=False).target_ids[-len(answer) - 1] != -100

    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config == json.loads((CHECKPOINT / "processor_config.json").read_text())
    reloaded = DeepseekVLV2Processor.from_pretrained(tmp_path)
    assert torch.equal(
        reloaded(conversations=conversation).input_ids, processor(conversations=conversation).input_ids
    )


def test_from_pretrained_missing_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="processor_config.json or tokenizer_config.json"):
        DeepseekVLV2Processor.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repo id"):
        DeepseekVLV2Processor.from_pretrained(tmp_path / "nope")


def test_unknown_kwargs_warn(processor):
    with pytest.warns(UserWarning, match="return_tensors"):
        processor(prompt="Hi", return_tensors="pt")


IMAGE = Image.new("RGB", (64, 48), "blue")
LOOK = [{"role": USER, "content": "Look"}, {"role": ASSISTANT, "content": ""}]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "<image><image>Compare.", "images": [IMAGE]}, "has 2 <image> tags but 1 images"),
        (
            {"conversations": LOOK, "images": [IMAGE]},
            "has 0 <image> tags but 1 images",
        ),
        ({"conversations": [{"role": "bot", "content": "Hi"}]}, "Unknown role 'bot' in message 0"),
        ({"conversations": []}, "conversation is empty"),
        (
            {"conversations": [{"role": USER, "content": "Hi"}, {"role": ASSISTANT, "content": "<image>"}]},
            r"Message 1 \(<\|Assistant\|>\) contains <image>",
        ),
        ({"prompt": "<image>Hi", "images": ["a.png"]}, r"images\[0\] is a builtins.str, not a PIL image.*load_image"),
        ({"prompt": "<image>Hi", "images": IMAGE}, "wrap a single image"),
        (
            {"conversations": [{"role": USER, "content": "Hi"}]},
            r"must end with an assistant message.*append \{'role': '<\|Assistant\|>', 'content': ''\}",
        ),
        ({"prompt": "Hi", "conversations": [{"role": USER, "content": "Hi"}]}, "exactly one of prompt="),
        ({}, "exactly one of prompt="),
        (
            {"conversations": [{"role": USER, "content": "Hi"}, {"role": "system", "content": "x"}]},
            "may only be the first message",
        ),
        ({"conversations": [[{"role": USER, "content": "Hi"}]] * 2, "images": [IMAGE, IMAGE]}, "list of 2 lists"),
        ({"conversations": [[{"role": USER, "content": "Hi"}]] * 2, "images": [[], [], []]}, "but 3 image lists"),
    ],
)
def test_errors(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_offline_hub_id_says_how_to_pass_a_folder(tmp_path, monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="local folder"):
        DeepseekVLV2Processor.from_pretrained("deepseek-ai/deepseek-vl2-tiny", cache_dir=str(tmp_path))


def test_tokenizer_adds_bos_like_the_official_one(processor) -> None:
    """The golden README: encode('Hello, world!') prepends bos (add_bos_token: true); the processor never does."""
    tokenizer = processor.tokenizer
    assert tokenizer.encode("Hello, world!") == [0, 19923, 14, 2058, 3]
    assert tokenizer.encode("Hello, world!", add_special_tokens=False) == [19923, 14, 2058, 3]
    assert len(tokenizer) == 128823


def test_old_pillow_is_warned_about() -> None:
    """Pillow 12 misses test_images_bit_exact[09_edge_tall_90x1500] by 1-2 levels; 13 is required for exact tiles."""
    from deepseek_vl.models import warn_if_old_pillow

    with pytest.warns(UserWarning, match=r"Pillow 12.3.0 tiles some images slightly differently.*pillow>=13"):
        warn_if_old_pillow("12.3.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_old_pillow("13.0.0")
