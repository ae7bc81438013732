"""The fast inference paths keep the official outputs: latent MLA cache, both MLA forms, logits_to_keep, expert dispatch."""

from __future__ import annotations

import threading

import pytest
import torch

from deepseek_vl.models.language import ONEDNN, DeepseekV2MLA, DeepseekV2MoE, linear
from golden import assert_close, checkpoint, model_case, official_inputs

CASE = "01_single_image_grounding"


@pytest.mark.parametrize("variant", ["small", "base"])
def test_mla_cache_holds_only_the_latent(load_model, variant: str) -> None:
    model = load_model(variant)
    config = model.config.language_config
    inputs = official_inputs(CASE)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    length = inputs["input_ids"].shape[1]
    for layer in cache.layers:
        assert layer.keys.shape == (1, 1, length, config.qk_rope_head_dim)  # shared rope key
        assert layer.values.shape == (1, 1, length, config.kv_lora_rank)  # normalised latent
    per_token_layer = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values)) / length
    assert per_token_layer == (config.kv_lora_rank + config.qk_rope_head_dim) * 4


@pytest.mark.parametrize("variant", ["small", "base"])
@pytest.mark.parametrize("absorbed_max_queries", [0, 100_000])
def test_both_mla_forms_reproduce_official_generation(
    load_model, monkeypatch, variant: str, absorbed_max_queries: int
) -> None:
    """0: decode also decompresses keys/values; 100000: prefill also attends in the latent space."""
    model = load_model(variant)
    inputs = official_inputs(CASE)
    monkeypatch.setattr(DeepseekV2MLA, "absorbed_max_queries", absorbed_max_queries)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        out = model.language.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pad_token_id=1, bos_token_id=0,
            eos_token_id=1, max_new_tokens=12, do_sample=False,
        )  # fmt: skip
        last = model.language(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits
    expected = model_case(variant, CASE)[1]
    assert torch.equal(out, expected["generated_ids"])
    assert_close(last[:, -1], expected["prefill_last_logits"], atol=2e-4, rtol=1e-4, name="last logits")


def test_logits_to_keep_projects_only_the_last_positions(load_model) -> None:
    model = load_model("tiny")
    ids = torch.tensor([[0, 19923, 14, 2058, 3, 128821]])
    with torch.no_grad():
        full = model.language(input_ids=ids, use_cache=False).logits
        last = model.language(input_ids=ids, use_cache=False, logits_to_keep=2).logits
    assert last.shape == (1, 2, full.shape[-1])
    assert torch.equal(last, full[:, -2:])


@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_decode_runs_only_the_chosen_experts(load_model, variant: str) -> None:
    """A batch-1 decode step touches the weights of exactly the experts its token chose."""
    model = load_model(variant)
    moe = next(m for m in model.language.modules() if isinstance(m, DeepseekV2MoE))
    calls: list[int] = []
    hooks = [e.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, e in enumerate(moe.experts)]
    chosen: list[torch.Tensor] = []
    hooks.append(moe.gate.register_forward_hook(lambda m, a, o: chosen.append(o[0])))
    try:
        with torch.no_grad():
            out = model.language(input_ids=torch.tensor([[0, 19923, 14]]), use_cache=True)
            calls.clear(), chosen.clear()
            model.language(input_ids=torch.tensor([[2058]]), cache=out.cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert sorted(calls) == sorted(chosen[0].flatten().tolist())
    assert len(calls) == model.config.language_config.num_experts_per_tok


@pytest.mark.parametrize("shape", [(1, 1280), (1, 3, 896)])
def test_one_row_linear_split_over_threads_is_bit_identical(monkeypatch, shape: tuple[int, ...]) -> None:
    """A one-row fp32 product runs as blocks of output rows, one per thread, and equals F.linear bit for bit."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1792, shape[-1], generator=generator)
    x = torch.randn(*shape, generator=generator)[..., -1:, :]  # one row, an offset view as in the MoE slices
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = torch.nn.functional.linear(x, weight)
        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.functional, "linear", None)  # the split path does not call it
            actual = linear(x, weight)
    finally:
        torch.set_num_threads(threads)
    assert actual.shape == expected.shape and torch.equal(actual, expected)


def test_decode_batch_linear_split_over_threads_matches_f_linear() -> None:
    """A decode batch (B, 1, D) takes the split path too: the exact product up to fp32 summation error, as F.linear."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(896, 1280, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (2, 5, 8, 16):
            x = torch.randn(rows, 2, 1280, generator=generator)[:, 1:]
            exact = x.double() @ weight.double().T
            bound = 1e-5 * (x.double().abs() @ weight.double().abs().T)  # fp32 summation error of 1280 terms
            for result in (linear(x, weight), torch.nn.functional.linear(x, weight)):
                assert result.shape == (rows, 1, 896) and ((result.double() - exact).abs() <= bound).all()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["tiny", "small"])  # MHA decode attention; MLA latent attention
def test_one_row_bf16_decode_steps_run_on_torch_kernels_as_accurately(load_model, monkeypatch, variant: str) -> None:
    """Batch-1 bf16 decode steps on CPU run with oneDNN off (torch's matrix-vector kernel), prompts and batches with
    it on; the switch is back afterwards, and the step's logits are as close to the fp32 model's as those of the
    official eager math on oneDNN."""
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    language = DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant), dtype=torch.bfloat16).eval().language
    reference = load_model(variant).language  # the same bf16 weights, in fp32
    seen: list[bool] = []
    f_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        if x.dtype == torch.bfloat16:
            seen.append(torch.backends.mkldnn.enabled)
        return f_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    prompt = torch.tensor([[0, 19923, 14, 2058, 3, 128821]])
    with torch.no_grad():
        cache = language(input_ids=prompt, use_cache=True).cache
        assert seen and all(seen)
        seen.clear()
        step = language(input_ids=prompt[:, -1:], cache=cache, use_cache=True).logits
        assert seen and not any(seen) and torch.backends.mkldnn.enabled
        seen.clear()
        language(input_ids=prompt[:, -2:].T, use_cache=False)  # two rows of one token each
        assert seen and all(seen)
        monkeypatch.setattr(torch.nn.functional, "linear", f_linear)
        cache = language(input_ids=prompt, use_cache=True).cache
        monkeypatch.setattr(language.config, "_attn_implementation", "eager")  # the official math, on oneDNN:
        hidden = language.model(input_ids=prompt[:, -1:], cache=cache, use_cache=True).last_hidden_state
        onednn = language.lm_head(hidden).float()  # the same step, outside the switch
        exact = reference(input_ids=torch.cat([prompt, prompt[:, -1:]], 1), use_cache=False).logits[:, -1:]
    torch_error, onednn_error = (step - exact).abs().mean(), (onednn - exact).abs().mean()
    assert torch_error <= 1.25 * onednn_error


def test_onednn_switch_is_restored_by_the_last_of_concurrent_holders() -> None:
    """Two threads inside at once: off until both have left, then the setting found (on or off) is back."""
    for initial in (True, False):
        torch.backends.mkldnn.enabled = initial
        entered, first_left, states = threading.Event(), threading.Event(), []

        def first() -> None:
            with ONEDNN.off():
                entered.set()
                first_left.wait()
            states.append(torch.backends.mkldnn.enabled)  # the second holder is still inside

        thread = threading.Thread(target=first)
        thread.start()
        entered.wait()
        with pytest.raises(RuntimeError), ONEDNN.off():
            first_left.set()
            thread.join()
            states.append(torch.backends.mkldnn.enabled)
            raise RuntimeError("a failing step")
        assert states == [False, False] and torch.backends.mkldnn.enabled is initial
    torch.backends.mkldnn.enabled = True
