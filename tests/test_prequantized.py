"""Pre-quantized AutoRound checkpoints (auto-round's own ``auto_round`` format) load onto this package's model.

The checkpoint is made here as Intel's int4 DeepSeek-VL2 uploads were made: auto-round at 4 bits, groups of 128, symmetric, over
``language.model.layers`` only (vision, projector, embeddings and ``lm_head`` stay bf16; auto-round keeps the router
gates), in its fastest mode (round-to-nearest, ``iters=0``: no calibration data), saved in the ``auto_round`` format.
auto-round quantizes only layers whose sizes are multiples of 32 and loads only those whose inputs are multiples of the
group, so the 16-wide golden Tiny / Small architectures are widened to 128. The reference is the same checkpoint's
integers dequantized with auto-round's own formula into a plain bf16 checkpoint, loaded without quantization.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from golden import checkpoint, official_inputs, widened_checkpoint
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek_vl.models import DeepseekVLV2ForCausalLM, language
from deepseek_vl.models.language import DeepseekV2MoE, MoEGate
from deepseek_vl.train.merge import PROCESSOR_FILES

if not os.environ.get("DEEPSEEK_VL_REQUIRE_AUTOROUND"):  # .ci/run sets it: there the test extra installs auto-round
    pytest.importorskip("auto_round", reason="auto-round is the optional [autoround] extra")



def widened(variant: str, folder) -> str:
    """The golden architecture (heads, experts, routing unchanged) with every language width a multiple of 128."""
    mla = {"kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 64}
    return widened_checkpoint(variant, folder, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                              **(mla if variant != "tiny" else {}))  # fmt: skip


def autoround_checkpoint(source: str, folder) -> str:
    """``source`` quantized by auto-round as the Hub uploads are (see the module docstring); returns its folder."""
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    model = DeepseekVLV2ForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    for module in model.modules():  # auto-round quantizes exact nn.Linear modules, as the official model has
        if type(module) is language.Linear:
            module.__class__ = nn.Linear
    rtn = AutoRound(
        model, AutoTokenizer.from_pretrained(source), bits=4, group_size=128, sym=True, iters=0, disable_opt_rtn=True,
        to_quant_block_names="language.model.layers",
    )
    rtn.quantize_and_save(str(folder), format="auto_round")
    saved = next(folder.rglob("config.json")).parent  # auto-round adds a subfolder named after the scheme
    for name in PROCESSOR_FILES:
        shutil.copy(f"{source}/{name}", saved / name)
    return str(saved)


def dequantized(folder: str, out) -> str:
    """The checkpoint with each packed layer's float16 weight ``scale * (q - zero)``, as auto-round's CPU kernel
    computes it: 4-bit q packed 8 per int32 along the inputs, zeros stored minus one (the GPTQ v1 layout)."""
    tensors, plain = load_file(f"{folder}/model.safetensors"), {}
    for key, value in tensors.items():
        name, _, part = key.rpartition(".")
        if part == "qweight":
            q = torch.stack([(value >> (4 * i)) & 15 for i in range(8)], 1).flatten(0, 1)  # (K, N)
            packed_zeros, scales = tensors[f"{name}.qzeros"], tensors[f"{name}.scales"]  # (G, N/8), (G, N)
            zeros = torch.stack([(packed_zeros >> (4 * i)) & 15 for i in range(8)], 2).flatten(1, 2) + 1  # (G, N)
            group = q.shape[0] // scales.shape[0]
            w = scales.repeat_interleave(group, 0) * (q - zeros.repeat_interleave(group, 0)).to(scales.dtype)
            plain[f"{name}.weight"] = w.T.contiguous()
        elif part not in ("qzeros", "scales"):
            plain[key] = value
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(Path(folder, "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    for name in PROCESSOR_FILES:
        shutil.copy(f"{folder}/{name}", out / name)
    return str(out)


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    """{variant: (auto-round folder, its dequantized bf16 copy)}, made once per module."""
    folders = {}
    for variant in ("tiny", "small"):
        source = widened(variant, tmp_path_factory.mktemp(f"wide-{variant}"))
        folder = autoround_checkpoint(source, tmp_path_factory.mktemp(f"autoround-{variant}"))
        folders[variant] = folder, dequantized(folder, tmp_path_factory.mktemp(f"dequantized-{variant}"))
    return folders


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_autoround_checkpoint_equals_its_dequantized_weights(variant, prequantized, monkeypatch):
    """``AutoModelForCausalLM.from_pretrained(folder)`` on CPU: the language layers run auto-round's packed kernels
    (the MLA latent decode and the grouped MoE too), logits and greedy tokens as the dequantized weights give."""
    from transformers import AutoModelForCausalLM

    folder, plain = prequantized[variant]
    model = AutoModelForCausalLM.from_pretrained(folder)
    reference = DeepseekVLV2ForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16  # the checkpoint's dtype (auto-round casts a float32 request to float16)
    layers = model.language.model.layers
    packed = [name for name, module in layers.named_modules() if type(module).__name__ == "QuantLinear"]
    plain_layers = reference.language.model.layers
    linears = [name for name, module in plain_layers.named_modules() if type(module) is language.Linear]
    assert packed == linears  # every linear of the decoder layers, the router gates are no Linear
    assert all(type(layer.mlp.gate) is MoEGate for layer in layers[1:])
    assert type(model.language.lm_head) is language.Linear and type(model.projector.layers[0]) is nn.Linear

    def refuse(*args):
        raise AssertionError("the reference MoE path ran")

    monkeypatch.setattr(DeepseekV2MoE, "routed_reference", refuse)
    inputs = official_inputs("01_single_image_grounding")
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        got, want = (m(**inputs, logits_to_keep=400).logits for m in (model, reference))
    torch.testing.assert_close(got, want)
    generated, expected = (m.generate(**inputs, max_new_tokens=8, do_sample=False) for m in (model, reference))
    assert torch.equal(generated, expected)
    if variant == "small":  # the absorbed decode read kv_b_proj's weight from its packed integers
        assert layers[0].self_attn.dense_kv_b.shape == (2 * (32 + 64), 128)


def test_chat_on_an_autoround_checkpoint(prequantized):
    """VLChat's dtype "auto" (float32 on CPU) is bfloat16 for it; float32, which auto-round would silently turn into
    float16, is refused."""
    from deepseek_vl.chat import VLChat

    folder, plain = prequantized["small"]
    image = str(checkpoint("small").parents[1] / "images" / "visual_grounding_1.jpeg")
    conversation = [{"role": "user", "content": "Describe.", "images": [image]}]
    pipes = [VLChat.from_pretrained(path, device="cpu", dtype=dtype, progress=False)
             for path, dtype in ((folder, "auto"), (plain, "bfloat16"))]  # fmt: skip
    assert pipes[0].model.dtype == torch.bfloat16
    answers = [pipe.chat(conversation, max_new_tokens=6).token_ids for pipe in pipes]
    assert answers[0] == answers[1]
    with pytest.raises(ValueError, match="runs in bfloat16 or float16"):
        DeepseekVLV2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
