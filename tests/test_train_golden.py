"""Training objective against the official implementation: the loss and every parameter's gradient in train mode.

The goldens (../shared/golden/train) hold the official loss and gradients on the golden checkpoints: T1 is one
image with the auxiliary load-balancing loss on (alpha 0.001, seq_aux), T2 a right-padded batch of a text-only
and a multi-turn image conversation with alpha 0 (see that README for why). The batch is rebuilt here with this
package's processor in training mode and must equal the golden ids and labels token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from golden import GOLDEN, assert_close, checkpoint

CASES = ("T1_single_image_grounding", "T2_batch_text_and_image_right_padded")
ROLES = {"<|User|>": "user", "<|Assistant|>": "assistant"}


def golden_case(variant: str, case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = GOLDEN / "train" / f"vl2-{variant}-random" / case
    return json.loads(path.with_suffix(".json").read_text()), load_file(str(path.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def processor():
    from deepseek_vl.models import DeepseekVLV2Processor

    return DeepseekVLV2Processor.from_pretrained(checkpoint("tiny"))


def build_batch(processor, info: dict):
    from deepseek_vl.utils.io import load_pil_images

    samples = []
    for conversation in info["conversations"]:
        conversation = [
            {**message, "images": [str(GOLDEN / "images" / name) for name in message.get("images", [])]}
            for message in conversation
        ]
        images = load_pil_images(conversation)
        samples.append(processor.process_one(conversations=conversation, images=images, inference_mode=False))
    return processor.batchify(samples, padding=info["padding"])


def train_step(variant: str, batch, alpha: float):
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant), dtype=torch.float32)
    model.config.language_config.aux_loss_alpha = alpha
    model.train()
    loss = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, images=batch.images,
        images_seq_mask=batch.images_seq_mask, images_spatial_crop=batch.images_spatial_crop,
        labels=batch.labels, use_cache=False,
    ).loss  # fmt: skip
    loss.backward()
    return model, loss


@pytest.mark.parametrize("variant", ["tiny", "small"])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_match_official(processor, variant: str, case: str) -> None:
    info, golden = golden_case(variant, case)
    batch = build_batch(processor, info)
    assert torch.equal(batch.input_ids, golden["input_ids"])
    assert torch.equal(batch.attention_mask, golden["attention_mask"].bool())
    assert torch.equal(batch.labels, golden["labels"])

    model, loss = train_step(variant, batch, info["aux_loss_alpha"])
    assert abs(loss.item() - info["loss"]) <= 1e-4, (loss.item(), info["loss"])
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    expected = {key.removeprefix("grad."): value for key, value in golden.items() if key.startswith("grad.")}
    head = set(info["grad_norms_embedding_and_head"])
    assert set(grads) - head == set(expected), "the parameters that receive a gradient differ from the official ones"
    assert len(expected) == info["grad_params"]
    for name, value in expected.items():
        assert_close(grads[name], value, atol=1e-5, rtol=1e-4, name=name)
    for name, norm in info["grad_norms_embedding_and_head"].items():
        assert abs(grads[name].norm().item() - norm) <= 1e-4 + 1e-4 * norm, (name, grads[name].norm().item(), norm)


def test_aux_loss_changes_router_gradient_as_official(processor) -> None:
    """Without the balance loss T1's router gradients move by the amount the golden records: the test can fail."""
    info, golden = golden_case("tiny", CASES[0])
    model, _ = train_step("tiny", build_batch(processor, info), alpha=0.0)
    gate = "language.model.layers.1.mlp.gate.weight"
    effect = (model.get_parameter(gate).grad - golden[f"grad.{gate}"]).abs().max().item()
    assert effect > 1e-5
    worst = max(
        (model.get_parameter(name.removeprefix("grad.")).grad - value).abs().max().item()
        for name, value in golden.items()
        if name.endswith("mlp.gate.weight")
    )
    assert worst == pytest.approx(info["aux_effect_on_gate_grad_max_abs"], rel=1e-2)


def test_balance_loss_ignores_padding(processor) -> None:
    """A padded row's balance loss equals the unpadded row's: pads are not tokens."""
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), dtype=torch.float32)
    gate = model.language.model.layers[1].mlp.gate
    torch.manual_seed(0)
    x = torch.randn(1, 7, model.config.language_config.hidden_size)
    padded = torch.cat([x, torch.randn(1, 5, x.shape[-1])], dim=1)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :7] = True
    scores, scores_padded = gate.scores(x), gate.scores(padded)
    alone = gate.load_balancing_loss(scores, gate.select(scores)[0], torch.ones(1, 7, dtype=torch.bool))
    masked = gate.load_balancing_loss(scores_padded, gate.select(scores_padded)[0], mask)
    counted = gate.load_balancing_loss(scores_padded, gate.select(scores_padded)[0], torch.ones_like(mask))
    torch.testing.assert_close(masked, alone)
    assert not torch.allclose(counted, alone)


def test_base_router_trains_with_frozen_bias(processor) -> None:
    """noaux_tc (Base) cannot train in the official code; here its router gets a gradient and the bias none."""
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    info = json.loads((GOLDEN / "train" / "vl2-base-random" / f"{CASES[0]}.json").read_text())
    assert "official_error" in info
    info_tiny, _ = golden_case("tiny", CASES[0])
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("base"), dtype=torch.float32).train()
    batch = build_batch(processor, info_tiny)
    loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask",
                                           "images_spatial_crop", "labels")}).loss  # fmt: skip
    loss.backward()
    gate = model.language.model.layers[1].mlp.gate
    assert torch.isfinite(loss) and gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    assert gate.e_score_correction_bias.grad is None
