"""The in-place cache returns what DynamicCache returns, writes each step into the same buffer, and is generate's default."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from deepseek_vl.models.cache import InPlaceCache, InPlaceLayer
from golden import model_case, official_inputs

CASE = "01_single_image_grounding"


def same_entries(a: DynamicCache, b: DynamicCache) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers))


def test_updates_crop_and_batch_selection_match_dynamic_cache() -> None:
    torch.manual_seed(0)
    in_place, dynamic = InPlaceCache(), DynamicCache()

    def step(batch: int, tokens: int) -> None:
        for layer in range(2):
            k, v = torch.randn(batch, 3, tokens, 4), torch.randn(batch, 1, tokens, 6)  # MLA-like: different shapes
            out_a, out_b = in_place.update(k, v, layer), dynamic.update(k, v, layer)
            assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])

    for tokens in (5, 1, 1, 2 * InPlaceLayer.block, 1):  # the fourth outgrows the first buffer
        step(2, tokens)
    assert same_entries(in_place, dynamic) and in_place.get_seq_length() == dynamic.get_seq_length() == 8 + 512
    in_place.crop(-3), dynamic.crop(-3)
    step(2, 1)
    assert same_entries(in_place, dynamic) and in_place.get_seq_length() == 518
    in_place.batch_select_indices(torch.tensor([1])), dynamic.batch_select_indices(torch.tensor([1]))
    step(1, 1)
    step(1, 1)
    assert same_entries(in_place, dynamic) and in_place.get_seq_length() == 520


def test_decode_steps_write_into_one_buffer_without_copying_the_cache(load_model) -> None:
    model = load_model("small")  # MLA: the buffers hold the rope key and the latent
    with torch.no_grad():
        out = model.language(input_ids=torch.tensor([[0, 19923, 14]]), use_cache=True)
        cache = out.cache
        assert isinstance(cache, InPlaceCache)
        buffers = [layer._value_buffer.data_ptr() for layer in cache.layers]
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            token = model.language(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    assert cache.get_seq_length() == 7
    assert [layer._value_buffer.data_ptr() for layer in cache.layers] == buffers
    assert all(layer.values.data_ptr() == ptr for layer, ptr in zip(cache.layers, buffers))


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_generate_uses_the_in_place_cache_and_reproduces_official_tokens(load_model, variant: str) -> None:
    model = load_model(variant)
    inputs = official_inputs(CASE)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        out = model.language.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pad_token_id=1, bos_token_id=0,
            eos_token_id=1, max_new_tokens=12, do_sample=False, return_dict_in_generate=True,
        )  # fmt: skip
    assert isinstance(out.cache, InPlaceCache)
    assert torch.equal(out.sequences, model_case(variant, CASE)[1]["generated_ids"])


def test_generate_keeps_a_cache_the_caller_passed(load_model) -> None:
    """A caller's DynamicCache holding the prompt is the one generate extends, and the answer is unchanged."""
    model = load_model("small")
    prompt = torch.tensor([[0, 19923, 14, 2058, 3, 19923, 14]])
    options = dict(pad_token_id=1, eos_token_id=1, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = model.language.generate(input_ids=prompt, **options)
        cache = DynamicCache()
        model.language(input_ids=prompt[:, :-1], cache=cache, use_cache=True)
        out = model.language.generate(input_ids=prompt, cache=cache, **options)
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == prompt.shape[1] + 6 - 1  # the caller's cache holds all but the last token
