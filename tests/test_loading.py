"""Loading into another dtype than the checkpoint's: load at the stored dtype, then cast tensor by tensor, releasing
each tensor's pages of the mapped file (deepseek_vl/utils/loading.py). It must give exactly what transformers'
own cast-while-loading gives, and never touch data outside a mapped checkpoint. A damaged or foreign checkpoint
folder is one error naming the file (deepseek_vl/utils/checkpoint.py), on the command line and from the API."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from golden import VARIANTS, checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.options import ModelLoadError
from deepseek_vl.serve.cli import main
from deepseek_vl.utils.loading import _page_releaser, load_at_stored_dtype, stored_dtype


def transformers_load(path, **kwargs):
    """transformers' from_pretrained itself (it casts each tensor while loading), bypassing ours."""
    return super(DeepseekVLV2ForCausalLM, DeepseekVLV2ForCausalLM).from_pretrained(path, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cast_after_loading_equals_transformers_cast(variant):
    ours = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant), dtype=torch.float32)
    theirs = transformers_load(checkpoint(variant), dtype=torch.float32)
    for kind in ("named_parameters", "named_buffers"):
        mine, reference = dict(getattr(ours, kind)()), dict(getattr(theirs, kind)())
        assert mine.keys() == reference.keys()
        for name, tensor in reference.items():
            assert mine[name].dtype == tensor.dtype, name
            assert torch.equal(mine[name], tensor), name
    configs = lambda m: [m.config, *(getattr(m.config, n) for n in m.config.sub_configs)]
    assert [c.dtype for c in configs(ours)] == [c.dtype for c in configs(theirs)] == [torch.float32] * 4


def test_only_a_cpu_load_into_another_dtype_is_switched():
    path = checkpoint("tiny")
    kwargs = {"torch_dtype": "float32", "attn_implementation": "eager"}
    assert load_at_stored_dtype(path, kwargs) == torch.float32
    assert kwargs == {"dtype": torch.bfloat16, "attn_implementation": "eager"}
    for unchanged in ({"dtype": torch.bfloat16}, {"dtype": "auto"}, {}, {"dtype": torch.float32, "device_map": "auto"},
                      {"dtype": torch.float32, "quantization_config": object()}):  # fmt: skip
        before = dict(unchanged)
        assert load_at_stored_dtype(path, unchanged) is None
        assert unchanged == before


def test_stored_dtype_of_single_sharded_and_mixed_checkpoints(tmp_path):
    assert stored_dtype(checkpoint("tiny")) == torch.bfloat16
    assert stored_dtype(tmp_path) is None  # no weights: transformers reports it
    save_file(
        {"a": torch.zeros(2, dtype=torch.float16), "ids": torch.zeros(2, dtype=torch.int64)},
        tmp_path / "one.safetensors",
    )
    save_file({"b": torch.zeros(2, dtype=torch.float16)}, tmp_path / "two.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "one.safetensors", "ids": "one.safetensors", "b": "two.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert stored_dtype(tmp_path) == torch.float16  # integer tensors are never cast
    save_file({"b": torch.zeros(2, dtype=torch.float32)}, tmp_path / "two.safetensors")
    assert stored_dtype(tmp_path) is None  # mixed floating dtypes: let transformers cast each as it loads


def test_page_release_keeps_every_value():
    """Released pages of a mapped file read back from the file; anonymous memory is never released (it would be zeroed)."""
    anonymous = torch.arange(1 << 20, dtype=torch.float32)
    path = checkpoint("tiny") / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        name = max(f.keys(), key=lambda k: f.get_slice(k).get_shape()[0])
        mapped = f.get_tensor(name)
        expected = mapped.clone()
        release = _page_releaser()
        release(anonymous)
        resident = mapping_resident_bytes(mapped.data_ptr())
        release(mapped)
        assert mapping_resident_bytes(mapped.data_ptr()) <= resident - mapped.numel() * mapped.element_size() + 2 * 4096
        assert torch.equal(mapped, expected)
    assert torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.float32))


def mapping_resident_bytes(address: int) -> int:
    """Resident bytes of the memory mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("address not mapped")


LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
                "intermediate_size": 5632, "num_attention_heads": 32, "num_hidden_layers": 2, "vocab_size": 32000}  # fmt: skip
PROCESSOR_FILES = ("processor_config.json", "tokenizer.json")  # read by the processor, the others by the model


def tiny_copy(tmp_path: Path) -> Path:
    """A writable copy of the Tiny golden checkpoint (the shared one is read-only)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("tiny"), folder, copy_function=shutil.copyfile)
    folder.chmod(0o755)
    return folder


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def replace_with_folder(path: Path) -> None:
    """A file that cannot be read even by root, unlike a chmod 000 one."""
    path.unlink()
    path.mkdir()


def add_missing_shard(folder: Path) -> None:
    """The weights as the first shard of two, the second one absent."""
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (folder / "model.safetensors").rename(folder / first)
    with safe_open(folder / first, framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), first) | {"extra": second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {  # case: (file named, damage, what the message says)
    "no weights": ("", lambda f: (f / "model.safetensors").unlink(), "has a config.json but no weights"),
    "no config.json": ("", lambda f: (f / "config.json").unlink(), "has no config.json"),
    "weights cut in the header": ("model.safetensors", lambda f: truncate(f / "model.safetensors", 500), "is truncated"),
    "weights cut in the data": ("model.safetensors", lambda f: truncate(f / "model.safetensors", -1000), "is truncated"),
    "weights unreadable": ("model.safetensors", lambda f: replace_with_folder(f / "model.safetensors"), "cannot read"),
    "missing shard": ("", add_missing_shard, "lacks 1 of the 2 shards that model.safetensors.index.json names"),
    "corrupt config.json": ("config.json", lambda f: (f / "config.json").write_text('{"model_type": '), "not valid JSON"),
    "corrupt processor_config.json": (
        "processor_config.json", lambda f: (f / "processor_config.json").write_text('{"x": 1,,'), "not valid JSON"
    ),
    "truncated tokenizer.json": ("tokenizer.json", lambda f: truncate(f / "tokenizer.json", 1000), "not valid JSON"),
    "llama config.json": (
        "config.json", lambda f: (f / "config.json").write_text(json.dumps(LLAMA_CONFIG)), "describes a 'llama' model"
    ),
}  # fmt: skip


def api_error(folder: Path, file: str) -> str:
    """The message of the component that reads ``file``: the processor or the model (the latter without a tokenizer)."""
    with pytest.raises(ModelLoadError) as error:
        if file in PROCESSOR_FILES:
            DeepseekVLV2Processor.from_pretrained(folder)
        else:
            DeepseekVLV2ForCausalLM.from_pretrained(folder)
    return str(error.value)


@pytest.mark.parametrize("case", DAMAGES)
def test_damaged_checkpoint_is_one_error_line_naming_the_file(case, tmp_path, capsys):
    file, damage, says = DAMAGES[case]
    folder = tiny_copy(tmp_path)
    damage(folder)
    message = api_error(folder, file)
    assert says in message and str(folder / file) in message, message
    assert main(["generate", "Hi", "--model", str(folder), "--device", "cpu", "--max-new-tokens", "2"]) == 2
    *before, last = capsys.readouterr().err.splitlines()
    assert last == f"deepseek-vl2: error: {message}"
    assert all(line.startswith("Loading ") for line in before)  # a config read for the dtype fails before it


@pytest.mark.parametrize("file", ["model.safetensors", "processor_config.json"])
def test_unreadable_checkpoint_file_is_named(file, tmp_path):
    folder = tiny_copy(tmp_path)
    (folder / file).chmod(0)
    if os.access(folder / file, os.R_OK):
        pytest.skip("running as root (or with CAP_DAC_OVERRIDE), which reads a chmod 000 file anyway")
    assert api_error(folder, file) == f"cannot read {folder / file}: Permission denied (check the file's permissions)"
