"""CUDA checks, run where a GPU is present (skipped on CPU-only machines, where every other test runs)."""

from __future__ import annotations

import pytest
import torch

from deepseek_vl.models import DeepseekVLV2ForCausalLM
from golden import assert_close, checkpoint, model_case, official_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CASES = ("01_single_image_grounding", "10_batch_three")


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
@pytest.mark.parametrize("case", CASES)
def test_cuda_float32_reproduces_official_outputs(variant: str, case: str) -> None:
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant), dtype=torch.float32).cuda().eval()
    inputs = {key: value.cuda() for key, value in official_inputs(case).items()}
    expected = model_case(variant, case)[1]
    with torch.no_grad():
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits
        out = model.generate(**inputs, pad_token_id=1, bos_token_id=0, eos_token_id=1, max_new_tokens=12, do_sample=False)
    assert_close(logits[:, -1], expected["prefill_last_logits"], atol=2e-4, rtol=1e-4, name="last logits")
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :].cpu(), expected["generated_ids"])


def test_model_card_bfloat16_on_cuda() -> None:
    """`model.to(torch.bfloat16).cuda()` with float32 processor images, as the model card does."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("small")).to(torch.bfloat16).cuda().eval()
    inputs = {key: value.cuda() for key, value in official_inputs(CASES[0]).items()}
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pad_token_id=1, max_new_tokens=4, do_sample=False
        )
    assert embeds.dtype == torch.bfloat16 and out.shape == (1, 4)
