"""Loading the checkpoints the usual ways: from the Hub cache, with transformers' keywords, quantized and saved, with
transformers' bitsandbytes config. Each test is a defect found in review (see the test's docstring)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from golden import checkpoint
from safetensors.torch import load_file, save_file
from test_loading import mapping_resident_bytes
from test_quantization import load, widened

from deepseek_vl.models import DeepseekVLV2ForCausalLM, language
from deepseek_vl.quantization import Int8Linear
from deepseek_vl.utils import loading

TOKENS = {"input_ids": torch.tensor([[0, 5, 9, 100, 7, 128815, 12]])}


def hub_cache(tmp_path: Path, repo: str = "org/vl2-tiny") -> Path:
    """The Tiny checkpoint in a Hub cache laid out as huggingface_hub writes it: files in blobs/ named by their hash,
    the snapshot's names symbolic links to them."""
    folder = tmp_path / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    for file in checkpoint("tiny").iterdir():
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return tmp_path


def test_a_hub_cache_checkpoint_releases_its_pages_when_cast(tmp_path, monkeypatch):
    """The Hub cache maps a checkpoint through its blob, a file named by its hash, not *.safetensors: its pages were
    never released, and a float32 load of a Hub id peaked at the float32 model plus the whole bf16 file."""
    released = []
    real = loading._page_releaser

    def measured(*args):
        release = real(*args)

        def measure(tensor: torch.Tensor) -> None:
            before = mapping_resident_bytes(tensor.data_ptr())
            release(tensor)
            released.append(before - mapping_resident_bytes(tensor.data_ptr()))

        return measure

    monkeypatch.setattr(loading, "_page_releaser", measured)
    cache = hub_cache(tmp_path)
    model = DeepseekVLV2ForCausalLM.from_pretrained(
        "org/vl2-tiny", dtype=torch.float32, cache_dir=str(cache), local_files_only=True
    )
    assert model.dtype == torch.float32
    weights = (checkpoint("tiny") / "model.safetensors").stat().st_size
    assert sum(released) >= 0.9 * weights, (sum(released), weights)


def test_modules_import_first_in_a_fresh_process():
    """``import deepseek_vl.quantization`` (or ``deepseek_vl.utils.loading``) first in a process was a circular
    ImportError: loading.py imported transformers, whose import registers the models, which import loading.py."""
    for module in ("deepseek_vl.quantization", "deepseek_vl.utils.loading"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]


def test_saved_int8_model_reloads_and_runs_in_bfloat16(tmp_path):
    """The README's quantize, save, reload (bf16, the default): int8 weights read from the file as they lie in it,
    not on a 16-byte boundary, crashed torch's int8 kernel (segfault) at the first bf16 forward."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), quantize="int8", dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(**TOKENS).logits
    model.save_pretrained(tmp_path)
    again = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path)
    layers = [module for module in again.modules() if isinstance(module, Int8Linear)]
    assert layers and all(layer.weight.data_ptr() % 16 == 0 for layer in layers)  # before the forward that crashed
    with torch.no_grad():
        assert torch.equal(again(**TOKENS).logits, before)


def test_int8_layer_takes_bfloat16_inputs_at_any_offset():
    """A bf16 activation that starts off a 16-byte boundary (a slice of a larger tensor) crashed the int8 kernel too:
    run in a child process, so that the crash fails this test instead of ending the test run."""
    script = """
import torch
import deepseek_vl.models
from deepseek_vl.quantization import Int8Linear
torch.manual_seed(0)
layer = Int8Linear(64, 48, False, torch.bfloat16)
layer.set_weight(torch.randn(48, 64))
rows = torch.randn(3 * 64 + 1, dtype=torch.bfloat16)
x = rows[1:].view(3, 64)
assert x.data_ptr() % 16
assert torch.equal(layer(x), layer(x.clone()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])


def test_quantized_load_takes_torch_dtype():
    """``torch_dtype=``, the older name transformers still takes, was refused by ``quantize=`` as unknown."""
    model = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("tiny"), quantize="int8", torch_dtype=torch.float32)
    assert model.language.model.embed_tokens.weight.dtype == torch.float32
    assert model.language.model.layers[1].mlp.experts[0].up_proj.weight_scale.dtype == torch.float32


def test_saved_quantized_model_loads_in_its_own_dtype(tmp_path):
    """Without ``dtype`` (transformers: "auto", the checkpoint's dtype) a model quantized for float32 and saved came
    back in bf16: its float32 embeddings, norms and scales rounded, different outputs."""
    model = load(checkpoint("tiny"), quantize="int8")
    with torch.no_grad():
        before = model(**TOKENS).logits
    model.save_pretrained(tmp_path)
    for kwargs in ({}, {"dtype": "auto"}):
        again = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, **kwargs)
        assert again.language.model.embed_tokens.weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(again(**TOKENS).logits, before)


def test_bitsandbytes_config_quantizes_the_language_model(tmp_path):
    """``quantization_config=BitsAndBytesConfig(...)`` quantized the vision tower and projector and none of the
    language model: transformers converts only modules of type ``nn.Linear`` exactly (the language model's are a
    subclass), and the kept modules were set only for configs that call them ``modules_to_not_convert``. NF4 with
    double quantization in float32 is what ``quantize="nf4"`` computes, bit for bit."""
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    path = widened("small", tmp_path)  # NF4 blocks of 64 need inputs in multiples of 64
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = load(path, quantization_config=config)
    attention = model.language.model.layers[1].self_attn
    assert isinstance(model.language.model.layers[1].mlp.experts[0].up_proj, Linear4bit)
    assert isinstance(attention.q_proj, Linear4bit)
    assert type(attention.kv_b_proj) is language.Linear and type(model.language.lm_head) is language.Linear
    assert type(model.vision.blocks[0].attn.qkv) is torch.nn.Linear
    assert type(model.projector.layers[0]) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(model(**TOKENS).logits, load(path, quantize="nf4")(**TOKENS).logits)


def test_a_variant_loads_at_its_own_dtype(tmp_path):
    """With ``variant="fp16"`` the stored dtype was read from model.safetensors (bf16), not the variant's file: the
    fp16 weights were loaded into bf16, rounded, and cast back to fp16."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), folder, copy_function=shutil.copyfile)
    torch.manual_seed(0)
    fp16 = {k: torch.randn(v.shape).half() for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file(fp16, str(folder / "model.fp16.safetensors"), metadata={"format": "pt"})
    model = DeepseekVLV2ForCausalLM.from_pretrained(folder, variant="fp16", dtype=torch.float16)
    assert all(torch.equal(tensor, fp16[name]) for name, tensor in model.state_dict().items())
