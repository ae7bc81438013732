"""Quantized models through the serving paths: the engine against `VLChat.chat`, saved quantized folders as
`--model`, adapters, and the int8 kernel's input alignment."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path
from shutil import copyfile

import pytest
import torch
from golden import GOLDEN, checkpoint

from deepseek_vl.chat import VLChat
from deepseek_vl.engine import Engine
from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.models.language import DeepseekV2MLA, DeepseekV2MoE
from deepseek_vl.quantization import Int8Linear

IMAGES = GOLDEN / "images"
REQUESTS = [  # (conversation, options): no, one and two images, prompts longer than the prefill budget, one sampled
    ([{"role": "user", "content": "Hello!"}], {"max_new_tokens": 6}),
    ([{"role": "user", "content": "Describe this.", "images": [str(IMAGES / "rgba_500x400.png")]}], {"max_new_tokens": 4}),
    ([{"role": "user", "content": "Compare.", "images": [str(IMAGES / "tiny_8x8.png"), str(IMAGES / "multi_image_2.jpeg")]}],
     {"max_new_tokens": 5}),
    ([{"role": "user", "content": "What is two plus two?"}], {"max_new_tokens": 5, "temperature": 0.8, "top_p": 0.9, "seed": 7}),
]  # fmt: skip


@pytest.fixture(scope="module")
def int8_small() -> VLChat:
    """The golden Small (MLA, grouped MoE) with int8 language layers. In float32, as the engine's other tests: in
    bfloat16 its chunked prefill and batched decode attention round differently from one request alone."""
    return VLChat.from_pretrained(checkpoint("small"), device="cpu", dtype="float32", quantize="int8", progress=False)


@pytest.fixture(scope="module")
def saved_int8(tmp_path_factory) -> Path:
    """The golden Tiny quantized to int8 and saved with its processor files: a folder for `--model`."""
    from deepseek_vl.train.merge import PROCESSOR_FILES

    folder = tmp_path_factory.mktemp("saved-int8")
    DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), quantize="int8").save_pretrained(folder)
    for name in PROCESSOR_FILES:
        copyfile(checkpoint("tiny") / name, folder / name)
    return folder


def test_engine_gives_the_tokens_of_chat_on_int8_weights_with_the_fast_paths(int8_small: VLChat, monkeypatch):
    """Rows join one per step, prompts run in chunks, one and two images, greedy and seeded rows; the engine runs
    the int8 kernels, the absorbed MLA attention and the grouped MoE (the reference MoE never)."""
    expected = [int8_small.chat(messages, **options).token_ids for messages, options in REQUESTS]
    calls = {"absorbed": 0, "int8": 0}

    def count(name, method):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(DeepseekV2MoE, "routed_reference", lambda *args: pytest.fail("the reference MoE path ran"))
    monkeypatch.setattr(DeepseekV2MLA, "absorbed_attention", count("absorbed", DeepseekV2MLA.absorbed_attention))
    monkeypatch.setattr(Int8Linear, "forward", count("int8", Int8Linear.forward))
    engine = Engine(int8_small, max_rows=3, prefill_budget=16, prefix_cache_bytes=0)
    handles = []
    for messages, options in REQUESTS:
        handles.append(engine.submit(messages, **options))
        engine.step()
    while not all(handle.done.is_set() for handle in handles):
        engine.step()
    assert [handle.wait().token_ids for handle in handles] == expected
    assert engine.max_batch > 1 and calls["absorbed"] > 0 and calls["int8"] > 0


def test_a_saved_quantized_folder_serves_as_quantizing_while_loading(saved_int8: Path):
    """`--model FOLDER` of a saved int8 model with `--dtype auto` loaded in float32 on CPU (the vision tower,
    embeddings and lm_head at twice the bytes), where `--quantize int8` of the original loads bfloat16."""
    from deepseek_vl.serve.cli import load_chat

    quantizing = VLChat.from_pretrained(checkpoint("tiny"), device="cpu", quantize="int8", progress=False)
    saved = VLChat.from_pretrained(saved_int8, device="cpu", progress=False)
    assert saved.model.dtype == quantizing.model.dtype == torch.bfloat16
    assert saved.model.language.model.embed_tokens.weight.dtype == torch.bfloat16
    messages = REQUESTS[1][0]
    assert saved.chat(messages, max_new_tokens=5).token_ids == quantizing.chat(messages, max_new_tokens=5).token_ids
    args = argparse.Namespace(model=str(saved_int8), device="cpu", dtype="auto", adapter=None, quantize=None)
    assert load_chat(args).model.dtype == torch.bfloat16  # serve, batch, demo, generate, chat
    assert (
        VLChat.from_pretrained(saved_int8, device="cpu", dtype="float32", progress=False).model.dtype == torch.float32
    )


@pytest.mark.parametrize(
    "config, dtype",
    [({"quantization": {"mode": "int4"}}, torch.bfloat16), ({"quantization_config": {"quant_method": "auto-round"}},
     torch.bfloat16), ({}, torch.float32)],
)  # fmt: skip
def test_the_command_line_loads_saved_quantized_checkpoints_in_bfloat16(config, dtype, tmp_path, monkeypatch):
    """`--dtype auto` was resolved to float32 on CPU before `VLChat` saw the folder: an AutoRound checkpoint, which
    float32 cannot load, was refused (the README has `generate --model folder` load it in bfloat16)."""
    import json

    from deepseek_vl.serve.cli import load_chat

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_vl_v2", **config}))
    seen = {}
    monkeypatch.setattr(VLChat, "from_pretrained", classmethod(lambda cls, model, **kwargs: seen.update(kwargs)))
    load_chat(argparse.Namespace(model=str(tmp_path), device="cpu", dtype="auto", adapter=None, quantize=None))
    assert seen["dtype"] == dtype


def test_an_adapter_on_a_saved_quantized_folder_is_refused_before_loading(saved_int8: Path, tmp_path, monkeypatch):
    """`--adapter` with a saved int8 folder loaded the model, then failed inside peft ("Target module Int8Linear
    ... is not supported"); `--quantize` with `--adapter` was already refused."""
    from deepseek_vl.train.lora import TrainableParts, apply_lora

    network = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), dtype=torch.float32)
    network.name_or_path = str(checkpoint("tiny"))
    apply_lora(network, TrainableParts()).save_pretrained(tmp_path)
    monkeypatch.setattr(DeepseekVLV2ForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=r"holds int8 weights.*merge the adapter into the full-precision model"):
        VLChat.from_pretrained(saved_int8, device="cpu", adapter=tmp_path, progress=False)


def test_int8_kernel_takes_bfloat16_inputs_on_any_boundary():
    """torch's int8 CPU kernel needs bfloat16 activations on a 32-byte boundary: one on a 16-byte boundary (a view
    into a larger tensor) crashed the process with a segmentation fault. Run apart, to survive a crash."""
    script = textwrap.dedent(
        """
        import torch
        from deepseek_vl.quantization import Int8Linear

        torch.manual_seed(0)
        layer = Int8Linear(16, 32, False, torch.bfloat16, device="meta")
        layer.set_weight(torch.randn(32, 16))
        flat = torch.randn(5 * 16 + 16).to(torch.bfloat16)
        for start in (0, 8):  # elements: 0 and 16 bytes past a fresh (64-byte aligned) allocation
            x = flat[start : start + 5 * 16].view(5, 16)
            assert torch.equal(layer(x), layer(x.clone())), start
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_int8_vision_layers_the_kernel_cannot_run_stay_in_the_model_dtype():
    """``quantize_vision=True`` in bfloat16 made the golden vision MLP's fc2 (239 inputs) int8, and the first image
    crashed the process (segmentation fault): torch's int8 CPU kernel needs bf16 rows of a multiple of 16 inputs."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), quantize="int8", quantize_vision=True)
    blocks = model.vision.blocks
    assert isinstance(blocks[0].attn.qkv, Int8Linear) and isinstance(model.projector.layers[0], Int8Linear)
    assert type(blocks[0].mlp.fc2) is torch.nn.Linear and blocks[0].mlp.fc2.weight.dtype == torch.bfloat16
    chat = VLChat(model, DeepseekVLV2Processor.from_pretrained(checkpoint("tiny")))
    assert len(chat.chat(REQUESTS[1][0], max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_fine_tuning_a_saved_quantized_folder_is_refused_before_loading(
    method: str, saved_int8: Path, tmp_path, monkeypatch
) -> None:
    """`finetune --model SAVED_INT8` loaded the model, then failed inside peft ("Target module Int8Linear ... is not
    supported"), or for --method qlora with a quantize= error; only QLoRA on a saved nf4 folder can train."""
    import json

    from deepseek_vl.train.trainer import FinetuneConfig, check_base_weights, load_model

    monkeypatch.setattr(DeepseekVLV2ForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    config = FinetuneConfig(model=str(saved_int8), output=str(tmp_path / "out"), method=method)
    with pytest.raises(ValueError, match=f"holds int8 weights, which --method {method} cannot train"):
        load_model(config)
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"mode": "nf4"}}))
    check_base_weights(tmp_path, "qlora")  # QLoRA's own base, saved: accepted
    with pytest.raises(ValueError, match="holds nf4 weights, which --method lora cannot train"):
        check_base_weights(tmp_path, "lora")
