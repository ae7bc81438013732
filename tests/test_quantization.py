"""Weight-only quantization (deepseek_vl/quantization.py) on the golden checkpoints and on a wider random model.

Quality floors are teacher-forced: the prompt of an image golden runs through the quantized and the original
model, and every position's logits are compared (top-1 agreement, mean relative error). The golden checkpoints
are 16 wide, too narrow for int4 groups, so int4 is measured on the golden Tiny/Small architectures widened to
128 (random weights, saved as a bf16 checkpoint).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from golden import checkpoint, official_inputs, widened_checkpoint
from deepseek_vl.models import DeepseekVLV2ForCausalLM
from deepseek_vl.models.language import DeepseekV2MoE, DeepseekV2MLA
from deepseek_vl import quantization
from deepseek_vl.quantization import (
    Int4Linear, Int8Linear, nf4_linear, place_nf4_saved, place_tensor, row_chunks, unpack_int4,
)

CASES = ("01_single_image_grounding",)
POSITIONS = 400  # the last positions of each prompt: image tokens and the text after them


def load(path, **kwargs) -> DeepseekVLV2ForCausalLM:
    return DeepseekVLV2ForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def widened(variant: str, folder) -> str:
    """The golden architecture at width 128 (heads, experts, routing unchanged), random bf16 weights."""
    mla = {"kv_lora_rank": 64, "qk_nope_head_dim": 32, "v_head_dim": 32} if variant != "tiny" else {}
    return widened_checkpoint(variant, folder, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, **mla)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return {v: widened(v, tmp_path_factory.mktemp(f"wide-{v}")) for v in ("tiny", "small")}


def agreement(quantized: nn.Module, reference: nn.Module) -> tuple[float, float, int]:
    """(top-1 agreement, mean relative logit error, positions) over the image prompts of CASES."""
    agree, errors = [], []
    for case in CASES:
        inputs = official_inputs(case)
        with torch.no_grad():
            want = reference(**inputs, logits_to_keep=POSITIONS).logits.flatten(0, 1)  # (positions, vocab)
            got = quantized(**inputs, logits_to_keep=POSITIONS).logits.flatten(0, 1)
        agree.append(want.argmax(-1) == got.argmax(-1))
        errors.append((got - want).norm(dim=-1) / want.norm(dim=-1))
    agree, errors = torch.cat(agree), torch.cat(errors)
    return agree.float().mean().item(), errors.mean().item(), len(agree)


@pytest.fixture(scope="module")
def int8_models():
    return {v: load(checkpoint(v), quantize="int8") for v in ("tiny", "small")}


@pytest.fixture(scope="module")
def nf4_models(wide):
    """bitsandbytes NF4 weights (CPU) on the golden ("tiny") or widened ("wide-tiny", "wide-small") models, loaded once."""
    models: dict = {}

    def get(name: str):
        if name not in models:
            models[name] = load(wide[name[5:]] if name.startswith("wide-") else checkpoint(name), quantize="nf4")
        return models[name]

    return get


# Floors from measurements on these random-weight models (their logits are close to ties, so top-1 flips easily):
# golden int8 0.955 / 0.993 top-1 at 2.3% / 1.2% error; wide int4 0.41 / 0.53 top-1 at 27% / 21% error, wide nf4 Tiny
# 0.48 at 22% (CPU, float32 activations). nf4 is measured on the wide models: the golden language layers have 16 or 32
# inputs, which NF4's blocks of 64 do not divide, so they stay unquantized (see test_what_is_nf4).
@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_int8_quality_on_golden_checkpoint(variant, load_model, int8_models):
    top1, error, positions = agreement(int8_models[variant], load_model(variant))
    print(f"golden {variant} int8: top-1 {top1:.4f}, relative error {error:.4f} over {positions} positions")
    assert positions >= 300
    assert top1 >= 0.92 and error <= 0.035, (top1, error)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_int4_quality_on_wide_model(variant, wide):
    top1, error, positions = agreement(load(wide[variant], quantize="int4"), load(wide[variant]))
    print(f"wide {variant} int4: top-1 {top1:.4f}, relative error {error:.4f} over {positions} positions")
    assert top1 >= 0.35 and error <= 0.35, (top1, error)


def test_nf4_quality_on_wide_model(wide, nf4_models):
    top1, error, positions = agreement(nf4_models("wide-tiny"), load(wide["tiny"]))
    print(f"wide tiny nf4: top-1 {top1:.4f}, relative error {error:.4f} over {positions} positions")
    assert top1 >= 0.35 and error <= 0.35, (top1, error)


def test_what_is_quantized(int8_models):
    model = int8_models["small"]
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    layer = "language.model.layers.1."
    for name in ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.o_proj", "mlp.experts.0.gate_proj",
                 "mlp.experts.7.down_proj", "mlp.shared_experts.up_proj"):
        assert kinds[layer + name] == "Int8Linear", name
    assert kinds["language.model.layers.0.mlp.down_proj"] == "Int8Linear"  # the dense first layer
    for name in (layer + "self_attn.kv_b_proj", "language.lm_head", "vision.blocks.0.attn.qkv", "projector.layers.0"):
        assert kinds[name] == "Linear", name
    assert model.language.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router untouched
    assert model.language.model.embed_tokens.weight.dtype == torch.float32
    with_vision = load(checkpoint("tiny"), quantize="int8", quantize_vision=True)
    assert isinstance(with_vision.vision.blocks[0].attn.qkv, Int8Linear)
    assert isinstance(with_vision.projector.layers[0], Int8Linear)


def test_what_is_nf4(nf4_models):
    import bitsandbytes as bnb

    model = nf4_models("wide-small")
    layer = model.language.model.layers[1]
    for module in (layer.self_attn.q_proj, layer.self_attn.kv_a_proj_with_mqa, layer.self_attn.o_proj,
                   layer.mlp.experts[0].gate_proj, layer.mlp.shared_experts.down_proj, model.language.model.layers[0].mlp.up_proj):
        assert isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state.quant_type == "nf4"
        assert module.weight.dtype == torch.uint8 and module.weight.numel() * 2 == module.in_features * module.out_features
    for module in (layer.self_attn.kv_b_proj, model.language.lm_head, model.vision.blocks[0].attn.qkv, model.projector.layers[0]):
        assert not isinstance(module, bnb.nn.Linear4bit) and module.weight.dtype == torch.float32
    assert layer.mlp.gate.weight.dtype == torch.float32  # router untouched
    assert len(model.quantized_modules) == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    golden = nf4_models("tiny")  # 16 inputs: kept; the dense first layer's down_proj has 64
    assert golden.quantized_modules == ["language.model.layers.0.mlp.down_proj"]


def test_nf4_keeps_shapes_bitsandbytes_dequantizes_wrongly():
    """Why layers with inputs not a multiple of 64 stay unquantized: on CPU, bitsandbytes places their blocks' scales
    wrongly (this fails once a bitsandbytes release fixes it, and the rule in replace_linears can go)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    torch.manual_seed(0)
    for k, worst in ((96, 0.2), (128, 0.1)):  # NF4 loses ~9% of a normal weight
        w = torch.randn(64, k)
        error = ((dequantize_4bit(*quantize_4bit(w, blocksize=64, quant_type="nf4")) - w).norm() / w.norm()).item()
        assert error > worst if k % 64 else error < worst, (k, error)


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_kernels_equal_dequantized_math(kind):
    """The packed kernels compute x @ dequantize(W).T: a broken packing or scale layout fails here."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    layer = kind(256, 48, bias=False, dtype=torch.float32)
    layer.set_weight(w)
    if kind is Int8Linear:
        dequantized = layer.weight.float() * layer.weight_scale[:, None]
    else:
        q = torch.stack([layer.state_dict()["weight"] & 15, layer.state_dict()["weight"] >> 4], -1).view(48, 256)
        scale, zero = layer.weight_scale_zero.float().unbind(-1)  # (G, N)
        groups = (q.float().view(48, -1, layer.group_size) - 8) * scale.T[..., None] + zero.T[..., None]
        dequantized = groups.view(48, 256)
    assert (dequantized - w).abs().max() < (0.02 if kind is Int8Linear else 0.3) * w.abs().max()
    torch.testing.assert_close(layer(x), x @ dequantized.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", [(64, 256), (48, 64)])
def test_nf4_kernel_equals_dequantized_math(shape):
    """Both of bitsandbytes' CPU paths (the AVX512-BF16 kernel for 64 outputs where the CPU has it, dequantize + matmul
    for 48) compute x @ dequantize(W).T, in bfloat16, the same for one row as for five."""
    from bitsandbytes.functional import dequantize_4bit

    torch.manual_seed(0)
    (n, k), x = shape, torch.randn(5, shape[1], dtype=torch.bfloat16)
    layer = nf4_linear((n, k), True, torch.bfloat16)
    w, bias = torch.randn(n, k), torch.randn(n)
    place_tensor(layer, "weight", w, torch.bfloat16, False, {})
    place_tensor(layer, "bias", bias, torch.bfloat16, False, {})
    dequantized = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    assert ((dequantized - w).norm() / w.norm()).item() < 0.12  # NF4 on normal weights: ~9%
    with torch.no_grad():
        got, one = layer(x).float(), layer(x[:1]).float()
    want = x.float() @ dequantized.T + bias.bfloat16().float()
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)  # bfloat16 products and sums
    torch.testing.assert_close(one, got[:1], atol=0.05, rtol=0.02)


def test_nf4_in_row_chunks_equals_bitsandbytes_whole(monkeypatch):
    """NF4 quantized in row chunks (bounded temporaries while loading) is bitwise bitsandbytes' own whole-tensor
    quantization: packed bytes, block scales and their double quantization, outputs; and it saves and reloads."""
    import bitsandbytes as bnb

    chunks = []

    def small_chunks(n: int, k: int) -> list[slice]:
        chunks.extend(row_chunks(n, k, elements=2**14))
        return chunks

    monkeypatch.setattr(quantization, "row_chunks", small_chunks)
    torch.manual_seed(0)
    (n, k), x = (320, 192), torch.randn(5, 192, dtype=torch.bfloat16)
    w = torch.randn(n, k) * torch.rand(n, 1)  # float32 in the file, bfloat16 in the model; rows of varied scale
    chunked = nn.ModuleDict({"layer": nf4_linear((n, k), False, torch.bfloat16)})
    place_tensor(chunked, "layer.weight", w, torch.bfloat16, False, {})
    assert [rows.stop - rows.start for rows in chunks] == [85, 85, 85, 65]  # 960 block scales: 4 of 256, ragged
    whole = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    whole.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, quant_type="nf4", blocksize=64, module=whole).to("cpu")
    saved, expected = chunked["layer"].state_dict(), whole.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[key], expected[key]) for key in saved)
    got, want = chunked["layer"].weight.quant_state, whole.weight.quant_state
    for part in ["absmax", "offset", "code", "state2.absmax", "state2.code"]:
        first, second = got, want
        for name in part.split("."):
            first, second = getattr(first, name), getattr(second, name)
        assert torch.equal(first, second), part
    with torch.no_grad():
        assert torch.equal(chunked["layer"](x), whole(x))
        reloaded = nn.ModuleDict({"layer": nf4_linear((n, k), False, torch.bfloat16)})
        parts = {"weight": saved["weight"], **{key[7:]: value for key, value in saved.items() if key.startswith("weight.")}}
        place_nf4_saved(reloaded, {"layer": parts}, torch.device("cpu"))
        assert torch.equal(reloaded["layer"](x), whole(x))


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_fast_paths_run_on_quantized_weights(mode, int8_models, nf4_models, monkeypatch):
    """Grouped MoE, latent MLA decode, incremental prefilling: used as with bf16 weights, and still exact."""
    import bitsandbytes as bnb

    model = int8_models["small"] if mode == "int8" else nf4_models("wide-small")
    kind = Int8Linear if mode == "int8" else bnb.nn.Linear4bit
    inputs = official_inputs(CASES[0])
    calls = {"absorbed": 0, "quantized": 0}

    def refuse(*args):
        raise AssertionError("the reference MoE path ran")

    def count(name, method):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(DeepseekV2MoE, "routed_reference", refuse)
    monkeypatch.setattr(DeepseekV2MLA, "absorbed_attention", count("absorbed", DeepseekV2MLA.absorbed_attention))
    monkeypatch.setattr(kind, "forward", count("quantized", kind.forward))
    full = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert calls["absorbed"] > 0 and calls["quantized"] > 0
    embeds, cache = model.incremental_prefilling(**inputs, chunk_size=256)
    chunked = model.generate(**inputs, inputs_embeds=embeds, past_key_values=cache, max_new_tokens=6, do_sample=False)
    assert torch.equal(full, chunked)
    latent = cache.layers[1]
    assert latent.values.shape[-1] == model.config.language_config.kv_lora_rank  # only the latent is cached


def test_batching_and_streaming_on_quantized_weights():
    from deepseek_vl.chat import VLChat

    pipe = VLChat.from_pretrained(checkpoint("small"), device="cpu", quantize="int8", progress=False)
    assert pipe.model.dtype == torch.bfloat16  # dtype "auto" with quantize
    image = str(checkpoint("small").parents[1] / "images" / "visual_grounding_1.jpeg")
    conversations = [[{"role": "user", "content": "Describe.", "images": [image]}],
                     [{"role": "user", "content": "Where is the giraffe?"}]]
    alone = [pipe.chat(c, max_new_tokens=6).text for c in conversations]
    assert [r.text for r in pipe.chat_batch(conversations, max_new_tokens=6)] == alone
    assert "".join(pipe.chat(conversations[0], max_new_tokens=6, stream=True)) == alone[0]


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4"])
def test_save_and_load_without_quantizing_again(mode, wide, nf4_models, tmp_path, monkeypatch):
    import bitsandbytes as bnb

    model = nf4_models("wide-small") if mode == "nf4" else load(wide["small"], quantize=mode)
    inputs = {"input_ids": torch.tensor([[0, 5, 9, 100, 7]])}
    before = model(**inputs).logits  # nf4: the first call repacks the weights for the CPU kernel; saving undoes it
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    assert json.loads((tmp_path / "config.json").read_text())["quantization"]["mode"] == mode
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as saved:
        stored = saved.get_tensor("language.model.layers.1.mlp.experts.0.up_proj.weight")
    assert stored.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    monkeypatch.setattr(Int8Linear, "set_weight", lambda *args: pytest.fail("quantized again"))
    monkeypatch.setattr(Int4Linear, "set_weight", lambda *args: pytest.fail("quantized again"))
    monkeypatch.setattr(bnb.nn.Params4bit, "_quantize", lambda *args: pytest.fail("quantized again"))
    monkeypatch.setattr(quantization, "quantize_nf4", lambda *args: pytest.fail("quantized again"))
    again = load(tmp_path)
    assert torch.equal(again(**inputs).logits, before)
    assert torch.equal(model(**inputs).logits, before)
    if mode == "int4":
        layer = again.language.model.layers[1].mlp.experts[0].up_proj
        assert torch.equal(unpack_int4(layer.weight, layer.out_features, layer.in_features), stored)
    with pytest.raises(ValueError, match=f"holds {mode} weights"):
        load(tmp_path, quantize="int8" if mode == "int4" else "int4")


def test_clear_errors(monkeypatch):
    import bitsandbytes as bnb

    with pytest.raises(ValueError, match="unknown quantize mode 'int3'"):
        load(checkpoint("tiny"), quantize="int3")
    with pytest.raises(ValueError, match="CPU and CUDA only, not mps"):
        load(checkpoint("tiny"), quantize="int8", device_map="mps")
    monkeypatch.setattr(bnb, "__version__", "0.45.5")
    with pytest.raises(ImportError, match=r"bitsandbytes>=0\.50 .*found 0\.45\.5: pip install -U bitsandbytes"):
        load(checkpoint("tiny"), quantize="nf4")
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install -U bitsandbytes"):
        nf4_linear((16, 16), False, torch.bfloat16)


def test_transformers_torchao_config_keeps_vision_and_head():
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(
        checkpoint("tiny"), dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    layer = model.language.model.layers[1]
    assert type(layer.mlp.experts[0].up_proj.weight).__name__ == "Int8Tensor"
    assert type(model.vision.blocks[0].attn.qkv.weight) is nn.Parameter
    assert type(model.language.lm_head.weight) is nn.Parameter


def test_hub_keywords_reach_the_config_and_weight_lookups(monkeypatch, tmp_path):
    """revision, token, ... of a Hub repo id reach the download, and the config lookup that finds a saved quantized model."""
    import huggingface_hub

    from deepseek_vl.models import modeling

    calls = []
    folder = checkpoint("tiny")

    def snapshot_download(repo_id, **kwargs):
        calls.append(("weights", repo_id, kwargs))
        return str(folder.parent)

    def cached_file(repo_id, filename, **kwargs):
        calls.append(("config", repo_id, kwargs))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(modeling, "cached_file", cached_file)
    hub = dict(revision="0123abc", token="hf_token", cache_dir="/cache", local_files_only=True, force_download=False)
    model = load("org/vl2-tiny", quantize="int8", subfolder=folder.name, **hub)
    assert isinstance(model.language.model.layers[1].mlp.experts[0].up_proj, Int8Linear)
    [(kind, repo, kwargs)] = calls
    assert (kind, repo, {key: kwargs[key] for key in hub}) == ("weights", "org/vl2-tiny", hub)
    assert kwargs["allow_patterns"] == [f"{folder.name}/*.json", f"{folder.name}/*.safetensors"]

    model.save_pretrained(tmp_path / "int8")  # a saved quantized repo, found by its config without quantize=
    folder = tmp_path / "int8"
    calls.clear()
    again = load("org/vl2-tiny-int8", subfolder="int8", **hub)
    assert [(kind, repo) for kind, repo, _ in calls] == [("config", "org/vl2-tiny-int8"), ("weights", "org/vl2-tiny-int8")]
    assert calls[0][2] == {**hub, "subfolder": "int8"}
    assert isinstance(again.language.model.layers[1].mlp.experts[0].up_proj, Int8Linear)
    with pytest.raises(TypeError, match="does not take proxies, quantization_config"):
        load(checkpoint("tiny"), quantize="int8", proxies={}, quantization_config=object())


def test_device_errors():
    """One device per quantized model, and it must exist: CUDA asked for on a machine without it is named."""
    with pytest.raises(ValueError, match="loads the model onto one device.*'cpu', 'cuda'"):
        load(checkpoint("tiny"), quantize="int8", device_map={"": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU; load with device_map='cpu'"):
            load(checkpoint("tiny"), quantize="int4", device_map="cuda")
        assert load(checkpoint("tiny"), quantize="int8", device_map="auto").device.type == "cpu"


def test_quantize_lm_head_opt_in(load_model, tmp_path):
    """lm_head stays in the model dtype unless asked; quantized, it keeps a quality floor and survives save/reload."""
    model = load(checkpoint("tiny"), quantize="int8", quantize_lm_head=True)
    assert isinstance(model.language.lm_head, Int8Linear)
    top1, error, _ = agreement(model, load_model("tiny"))
    print(f"golden tiny int8 + lm_head: top-1 {top1:.4f}, relative error {error:.4f}")
    assert top1 >= 0.92 and error <= 0.035, (top1, error)
    model.save_pretrained(tmp_path)
    assert isinstance(load(tmp_path).language.lm_head, Int8Linear)
    with pytest.raises(ValueError, match="quantize_lm_head=True needs quantize="):
        load(checkpoint("tiny"), quantize_lm_head=True)


def test_cpu_int4_checkpoint_on_cuda_is_a_clear_error(wide, tmp_path, monkeypatch):
    """CPU's int4 kernel takes inputs in multiples of 32, CUDA's in multiples of 128: such layers saved on CPU are
    named, with the fix, when loaded for CUDA (simulated: the device type is what decides which layers are int4)."""
    import deepseek_vl.quantization as quantization

    load(wide["small"], quantize="int4").save_pretrained(tmp_path)

    class CudaOnPaper:  # CUDA to replace_linears and the checks, the CPU to safetensors
        type = "cuda"

        def __str__(self) -> str:
            return "cpu"

    monkeypatch.setattr(quantization, "load_device", lambda device_map: CudaOnPaper())
    with pytest.raises(ValueError, match=r"int4 layers saved on CPU that CUDA's int4 kernel cannot run .*load it on CPU"):
        load(tmp_path)
