"""Loading into another dtype than the checkpoint's: load at the stored dtype, then cast tensor by tensor, releasing
each tensor's pages of the mapped file (deepseek_vl/utils/loading.py). It must give exactly what transformers'
own cast-while-loading gives, and never touch data outside a mapped checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from golden import VARIANTS, checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from deepseek_vl.models import DeepseekVLV2ForCausalLM
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
