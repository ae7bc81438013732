"""The model card's API end to end, Auto-class loading, the real Base layout, strict loading and input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import deepseek_vl  # noqa: F401  (registers the Auto classes)
from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.utils.io import load_pil_images
from golden import GOLDEN, checkpoint, model_case, processor_case

REPO = Path(__file__).resolve().parents[1]
TINY = checkpoint("tiny")
GROUNDING = [
    {
        "role": "<|User|>",
        "content": "<image>\n<|ref|>The giraffe at the back.<|/ref|>.",
        "images": [str(GOLDEN / "images" / "visual_grounding_1.jpeg")],
    },
    {"role": "<|Assistant|>", "content": ""},
]


def model_card_generate(model_path: Path, dtype: torch.dtype, max_new_tokens: int = 12) -> tuple[str, torch.Tensor]:
    """The model card's quick start, verbatim but for the path, the dtype and no .cuda()."""
    vl_chat_processor: DeepseekVLV2Processor = DeepseekVLV2Processor.from_pretrained(model_path)
    tokenizer = vl_chat_processor.tokenizer
    vl_gpt: DeepseekVLV2ForCausalLM = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True)
    vl_gpt = vl_gpt.to(dtype).eval()
    pil_images = load_pil_images(GROUNDING)
    prepare_inputs = vl_chat_processor(
        conversations=GROUNDING, images=pil_images, force_batchify=True, system_prompt=""
    ).to(vl_gpt.device)
    inputs_embeds = vl_gpt.prepare_inputs_embeds(**prepare_inputs)
    outputs = vl_gpt.language_model.generate(
        inputs_embeds=inputs_embeds,
        attention_mask=prepare_inputs.attention_mask,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
    )
    return prepare_inputs["sft_format"][0], outputs


def test_model_card_quick_start_matches_official_tokens() -> None:
    sft_format, outputs = model_card_generate(TINY, torch.float32)
    assert sft_format == processor_case("01_single_image_grounding")[0]["outputs"]["sft_format"][0]
    assert torch.equal(outputs, model_case("tiny", "01_single_image_grounding")[1]["generated_ids"])


def test_model_card_quick_start_in_bfloat16() -> None:
    """`vl_gpt.to(torch.bfloat16)` as in the model card: float32 images from the processor follow the model."""
    _, outputs = model_card_generate(TINY, torch.bfloat16, max_new_tokens=4)
    assert outputs.shape == (1, 4)


def test_quickstart_script_runs() -> None:
    image = GOLDEN / "images" / "visual_grounding_1.jpeg"
    command = [sys.executable, str(REPO / "examples" / "quickstart.py"), "--model", str(TINY), "--image", str(image)]
    result = subprocess.run([*command, "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "<|User|>: <image>\n<|ref|>The giraffe at the back.<|/ref|>." in result.stdout
    assert "is an Enum subclass" not in result.stderr  # torch's notices about torchao, which transformers imports


def test_third_party_notices_nobody_can_act_on_are_quiet() -> None:
    """torch's notices about torchao's enums, bitsandbytes' failed download of an optional Hub kernel (AVX512-BF16)."""
    pytest.importorskip("bitsandbytes")
    code = "import deepseek_vl, bitsandbytes, deepseek_vl.models"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "is an Enum subclass" not in result.stderr and "gemm_4bit_forward" not in result.stderr


def test_auto_classes_and_language_alias(load_model) -> None:
    assert isinstance(AutoConfig.from_pretrained(TINY), DeepseekVLV2Config)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    assert isinstance(model, DeepseekVLV2ForCausalLM)
    assert model.language is model.language_model


def test_real_base_layout_matches_official_weight_index() -> None:
    """The real Base config.json builds exactly the 6973 weights of the released model.safetensors.index.json."""
    real = GOLDEN / "real" / "deepseek-vl2"
    config = DeepseekVLV2Config.from_pretrained(real)
    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(config)
    index = json.loads((real / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert set(state) == set(index["weight_map"])
    assert sum(t.numel() for t in state.values()) * 2 == index["metadata"]["total_size"]
    language = config.language_config
    assert (language.num_hidden_layers, language.n_routed_experts, language.kv_lora_rank) == (30, 72, 512)
    assert language.q_lora_rank is None and language.use_mla and language.topk_method == "noaux_tc"


def copy_checkpoint(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(TINY, target)
    return target


def test_missing_weight_is_an_error_naming_it(tmp_path: Path) -> None:
    folder = copy_checkpoint(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["language.model.layers.1.mlp.gate.weight"]
    weights["vision.extra.weight"] = torch.zeros(1)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        DeepseekVLV2ForCausalLM.from_pretrained(folder)
    assert "language.model.layers.1.mlp.gate.weight" in str(error.value)
    assert "vision.extra.weight" in str(error.value)


def test_mis_shaped_weight_is_an_error(tmp_path: Path) -> None:
    folder = copy_checkpoint(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    weights["image_newline"] = torch.zeros(17, dtype=torch.bfloat16)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError), match="image_newline"):
        DeepseekVLV2ForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_checkpoint_folder_missing_files(tmp_path: Path, missing: str) -> None:
    folder = copy_checkpoint(tmp_path)
    (folder / missing).unlink()
    with pytest.raises((OSError, ValueError), match=missing.split(".")[0]):
        AutoModelForCausalLM.from_pretrained(folder)


# Greedy tokens of the official code (its `language.generate(inputs_embeds=...)`, fp32) for a 4,100-token text
# prompt on the golden checkpoints: the official model runs past max_position_embeddings (4096) without a check.
OFFICIAL_PAST_CONTEXT = {
    "tiny": [122856, 113980, 99344, 29788, 40235, 12635, 29788, 40235],
    "small": [16902, 26480, 51522, 8381, 116873, 59507, 77807, 81349],
    "base": [108699, 26840, 68452, 49042, 103252, 111382, 110267, 72497],
}


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_prompt_past_the_context_runs_as_the_official_code(load_model, variant: str) -> None:
    model = load_model(variant)
    ids = (torch.arange(4100) * 7919 % 120000 + 100)[None]
    ids[0, 0] = 0  # bos
    with torch.no_grad():
        embeds = model.language.get_input_embeddings()(ids)
        generated = model.language.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids), pad_token_id=1, bos_token_id=0,
            eos_token_id=1, max_new_tokens=8, do_sample=False, use_cache=True,
        )  # fmt: skip
    assert generated[0].tolist() == OFFICIAL_PAST_CONTEXT[variant]


def test_save_pretrained_round_trip(load_model, tmp_path: Path) -> None:
    model = load_model("tiny")
    model.save_pretrained(tmp_path)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(load_file(str(TINY / "model.safetensors")))
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 19923, 14, 2058, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_processor_batch_of_conversations_generates_official_tokens(load_model) -> None:
    """Several conversations in one processor call, left-padded, then one batched generate (case 10)."""
    model = load_model("small")
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint("small"))
    samples = processor_case("10_batch_three")[0]["inputs"]["samples"]
    conversations = [
        [{**m, "images": [str(GOLDEN / "images" / name) for name in m.get("images", [])]} for m in sample["conversation"]]
        for sample in samples
    ]
    inputs = processor(conversations=conversations, system_prompt="")
    with torch.no_grad():
        out = model.generate(
            **inputs, pad_token_id=1, bos_token_id=0, eos_token_id=1, max_new_tokens=12, do_sample=False
        )
    expected = model_case("small", "10_batch_three")[1]["generated_ids"]
    assert torch.equal(out[:, inputs.input_ids.shape[1] :], expected)


def test_text_only_prompt_without_images(load_model) -> None:
    model = load_model("base")
    processor = DeepseekVLV2Processor.from_pretrained(checkpoint("base"))
    inputs = processor(prompt="Write one line about rain.", apply_sft_format=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], model.config.language_config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loading(load_model, device_map: str) -> None:
    """device_map placement (accelerate), as VLChat loads onto GPUs, gives the plainly loaded model's logits."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(TINY, device_map=device_map, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 19923, 14, 2058, 3]])
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits.cpu()
        assert torch.allclose(logits, load_model("tiny")(input_ids=ids).logits, atol=1e-5)
