"""Placement with a device map (accelerate): the golden Tiny model split between the CPU and disk offload, the
way `device_map="auto"` spreads Small and Base over GPUs and the CPU, gives unchanged outputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from deepseek_vl.models import DeepseekVLV2ForCausalLM
from golden import assert_close, checkpoint, model_case, official_inputs

CASE = "06_text_only"  # short: the forward runs with weights read from disk each step
SPLIT = {
    "image_newline": "cpu", "view_seperator": "cpu",  # top-level parameters (accelerate warns they are no modules)
    "vision": "cpu", "projector": "cpu", "language.model.embed_tokens": "cpu", "language.model.layers.0": "cpu",
    "language.model.layers.1": "disk", "language.model.layers.2": "disk", "language.model.norm": "disk",
    "language.lm_head": "disk",
}  # fmt: skip


@pytest.fixture(scope="module")
def offload_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("offload")


@pytest.fixture(scope="module")
def split_model(offload_folder: Path) -> DeepseekVLV2ForCausalLM:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        model = DeepseekVLV2ForCausalLM.from_pretrained(
            checkpoint("tiny"), dtype=torch.float32, device_map=SPLIT, offload_folder=str(offload_folder)
        )
    return model.eval()


def test_the_split_is_real(split_model: DeepseekVLV2ForCausalLM) -> None:
    assert split_model.hf_device_map == SPLIT
    offloaded = next(split_model.language.model.layers[2].parameters())
    # not in memory: accelerate's hooks read the weights from disk (the safetensors file itself) for each forward
    assert offloaded.device.type == "meta"
    assert next(split_model.vision.parameters()).device.type == "cpu"


def test_outputs_are_unchanged(split_model: DeepseekVLV2ForCausalLM, load_model) -> None:
    whole = load_model("tiny")
    info, golden = model_case("tiny", CASE)
    inputs = official_inputs(CASE)
    with torch.inference_mode():
        embeds = split_model.prepare_inputs_embeds(**inputs)
        logits = split_model(**inputs).logits[:, -1]
        reference = whole(**inputs).logits[:, -1]
        generated = split_model.language.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pad_token_id=1, bos_token_id=0,
            eos_token_id=1, max_new_tokens=12, do_sample=False, use_cache=True,
        )  # fmt: skip
    assert torch.equal(logits, reference)  # same weights, same CPU kernels: bit for bit
    assert_close(logits, golden["prefill_last_logits"], atol=2e-4, rtol=1e-4, name="prefill_last_logits")
    assert torch.equal(generated, golden["generated_ids"])
