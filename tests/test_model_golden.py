"""The model against the official outputs for the three golden checkpoints (tolerances of the golden README)."""

from __future__ import annotations

import json

import pytest
import torch

from golden import GOLDEN, VARIANTS, assert_close, model_case, official_inputs, processor_case

PLAIN_CASES = ("01_single_image_grounding", "02_three_images_no_tiling", "06_text_only", "10_batch_three")
LOGIT_TOL = dict(atol=2e-4, rtol=1e-4)
HIDDEN_TOL = dict(atol=1e-4, rtol=1e-4)
EMBED_TOL = dict(atol=1e-5, rtol=1e-4)


def generation_kwargs(max_new_tokens: int = 12) -> dict:
    return dict(pad_token_id=1, bos_token_id=0, eos_token_id=1, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_inputs_embeds(load_model, variant: str, case: str) -> None:
    model = load_model(variant)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**official_inputs(case))
    assert_close(embeds, model_case(variant, case)[1]["inputs_embeds"], **EMBED_TOL, name="inputs_embeds")


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts(load_model, variant: str) -> None:
    """The parameter counts of the official model built from the same checkpoint (variant.json)."""
    model = load_model(variant)
    expected = json.loads((GOLDEN / "model" / f"vl2-{variant}-random" / "variant.json").read_text())["parameters"]

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(model) == expected["total"]
    assert count(model.vision) == expected["vision"]
    assert count(model.projector) == expected["projector"]
    assert count(model.language) == expected["language"]
    assert model.image_newline.numel() + model.view_seperator.numel() == expected["image_newline+view_seperator"]
    assert count(model.language.model.embed_tokens) == expected["language.model.embed_tokens"]
    assert count(model.language.lm_head) == expected["language.lm_head"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_vision_and_projector(load_model, variant: str) -> None:
    model = load_model(variant)
    expected = model_case(variant, "01_single_image_grounding")[1]
    with torch.no_grad():
        features = model.vision(official_inputs("01_single_image_grounding")["images"][0, :1])
        assert_close(features, expected["vision_tile0"], **EMBED_TOL, name="vision_tile0")
        assert_close(model.projector(expected["vision_tile0"]), expected["projector_tile0"], **EMBED_TOL, name="projector")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_prefill_logits(load_model, variant: str, case: str, attn_implementation: str) -> None:
    """Full forward without position_ids (rows numbered 0..T-1, as the official forward does)."""
    model = load_model(variant, attn_implementation)
    expected = model_case(variant, case)[1]
    inputs = official_inputs(case)
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    assert_close(logits[:, -1], expected["prefill_last_logits"], **LOGIT_TOL, name="last logits")
    real = inputs["attention_mask"].bool()
    top2 = logits.topk(2, dim=-1).values
    assert_close(top2[..., 0][real], expected["prefill_max"][real], **LOGIT_TOL, name="prefill_max")
    assert_close(logits.logsumexp(-1)[real], expected["prefill_logsumexp"][real], **LOGIT_TOL, name="logsumexp")
    clear = real & (expected["prefill_top1_top2_gap"] > 1e-3)
    assert torch.equal(logits.argmax(-1)[clear], expected["prefill_argmax"][clear])


@pytest.mark.parametrize("variant", VARIANTS)
def test_hidden_states(load_model, variant: str) -> None:
    model = load_model(variant)
    expected = model_case(variant, "01_single_image_grounding")[1]["hidden_states"]
    with torch.no_grad():
        out = model(**official_inputs("01_single_image_grounding"), output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == expected.shape[0]
    for i, (actual, reference) in enumerate(zip(out.hidden_states, expected)):
        assert_close(actual, reference, **HIDDEN_TOL, name=f"hidden_states[{i}]")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("where", ["router_l1", "router_l1_last16"])
def test_router_and_moe(load_model, variant: str, where: str) -> None:
    model = load_model(variant)
    info, expected = model_case(variant, "01_single_image_grounding")
    moe = model.language.model.layers[1].mlp
    x = expected[f"{where}_input"]
    with torch.no_grad():
        idx, weight = moe.gate(x)
        order = idx.argsort(dim=-1)
        assert torch.equal(idx.gather(1, order), expected[f"{where}_topk_idx"])
        assert idx.tolist() != [] and torch.equal(expected[f"{where}_topk_idx"], torch.tensor(info[f"{where}_topk_idx"]))
        assert_close(weight.gather(1, order), expected[f"{where}_topk_weight"], **HIDDEN_TOL, name="router weights")
        output_name = "moe_l1_output" if where == "router_l1" else "moe_l1_last16_output"
        assert_close(moe(x), expected[output_name], **HIDDEN_TOL, name="moe output")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_greedy_generation(load_model, variant: str, case: str) -> None:
    """The model card's call: language_model.generate on the prepared embeddings."""
    model = load_model(variant)
    expected = model_case(variant, case)[1]["generated_ids"]
    inputs = official_inputs(case)
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **generation_kwargs()
        )
    assert torch.equal(out, expected)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", PLAIN_CASES)
def test_teacher_forced_logits(load_model, variant: str, case: str) -> None:
    """One no-cache forward over prompt + generated tokens, positions as generate numbers them."""
    model = load_model(variant)
    expected = model_case(variant, case)[1]
    inputs = official_inputs(case)
    generated = expected["generated_ids"]
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        embeds = torch.cat([embeds, model.get_input_embeddings()(generated)], dim=1)
        mask = torch.cat([inputs["attention_mask"].long(), torch.ones_like(generated)], dim=1)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model.language(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False).logits
    prompt_length = inputs["input_ids"].shape[1]
    steps = logits[:, prompt_length - 1 : -1]  # (B, 12, V)
    top10 = steps.topk(10, dim=-1)
    assert_close(top10.values, expected["tf_top10_values"], **LOGIT_TOL, name="top10 values")
    assert_close(steps.logsumexp(-1), expected["tf_logsumexp"], **LOGIT_TOL, name="logsumexp")
    assert torch.equal(top10.indices[..., 0], expected["tf_top10_ids"][..., 0])
    # Lower ranks are compared where the official value is clear of both neighbours by more than the tolerance.
    values = expected["tf_top10_values"]
    tol = LOGIT_TOL["atol"] + LOGIT_TOL["rtol"] * values.abs()
    gaps = values[..., :-1] - values[..., 1:]  # (B, 12, 9), descending values
    clear = torch.ones_like(values, dtype=torch.bool)
    clear[..., :-1] &= gaps > 2 * tol[..., :-1]
    clear[..., 1:] &= gaps > 2 * tol[..., 1:]
    assert clear[..., 1:].any()
    assert torch.equal(top10.indices[clear], expected["tf_top10_ids"][clear])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [128, 1000, 5000])
def test_incremental_prefilling(load_model, variant: str, chunk_size: int) -> None:
    """The official README path: chunked prefill, then model.generate continuing from the cache."""
    model = load_model(variant)
    case = "01_single_image_grounding"
    inputs = official_inputs(case)
    with torch.no_grad():
        embeds, cache = model.incremental_prefilling(**inputs, chunk_size=chunk_size)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1] - 1
        out = model.generate(inputs_embeds=embeds, **inputs, past_key_values=cache, **generation_kwargs())
    prompt_length = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :prompt_length], inputs["input_ids"])
    assert torch.equal(out[:, prompt_length:], model_case(variant, case)[1]["incremental_generated_ids"])


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_repetition_penalty_of_a_left_padded_batch_equals_single_rows(load_model) -> None:
    """The model card's call with a repetition penalty: each row of a left-padded batch gives its unpadded tokens."""
    model = load_model("tiny")
    inputs = official_inputs("10_batch_three")
    options = {**generation_kwargs(15), "repetition_penalty": 1.1}
    with torch.no_grad():
        embeds = model.prepare_inputs_embeds(**inputs)
        batch = model.language_model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **options)
        for row, mask in enumerate(inputs["attention_mask"].bool()):
            alone = model.language_model.generate(inputs_embeds=embeds[row : row + 1, mask], **options)
            assert batch[row, : alone.shape[1]].tolist() == alone[0].tolist(), row


def test_language_model_takes_the_cache_under_either_name(load_model) -> None:
    """`cache=` or the older `past_key_values=` (the model card's name): a prefix's cache continues it either way."""
    model = load_model("tiny")
    ids = official_inputs("06_text_only")["input_ids"]
    with torch.no_grad():
        full = model.language_model(input_ids=ids).logits[:, -1]
        for name in ("cache", "past_key_values"):
            prefix = model.language_model(input_ids=ids[:, :-1], use_cache=True).cache
            last = model.language_model(input_ids=ids[:, -1:], use_cache=True, **{name: prefix}).logits[:, -1]
            assert_close(last, full, **LOGIT_TOL, name=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_prefilling_left_padded_batch(load_model, variant: str) -> None:
    """Unlike the official code, chunked prefill of a left-padded batch gives the unchunked tokens."""
    model = load_model(variant)
    inputs = official_inputs("10_batch_three")
    with torch.no_grad():
        embeds, cache = model.incremental_prefilling(**inputs, chunk_size=500)
        out = model.generate(inputs_embeds=embeds, **inputs, past_key_values=cache, **generation_kwargs())
    expected = model_case(variant, "10_batch_three")[1]["generated_ids"]
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_loss(load_model, variant: str) -> None:
    model = load_model(variant)
    info, expected = model_case(variant, "08_training_mode")
    _, tensors = processor_case("08_training_mode")
    inputs = official_inputs("08_training_mode")
    with torch.no_grad():
        loss = model(**inputs, labels=tensors["labels"], use_cache=False).loss
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected["loss"].item()) <= 1e-4
    # The train-mode (MoE training) path gives the same loss; the official Base router cannot run it at all.
    model.train()
    try:
        with torch.no_grad():
            train_loss = model(**inputs, labels=tensors["labels"], use_cache=False).loss
    finally:
        model.eval()
    reference = expected.get("loss_train_mode", expected["loss"]).item()
    assert abs(train_loss.item() - reference) <= 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_output_goes_straight_to_forward(load_model, variant: str) -> None:
    """model(**inputs) with the extra processor keys and an int64 images_seq_mask (the official batchify dtype)."""
    model = load_model(variant)
    inputs = official_inputs("10_batch_three")
    inputs["images_seq_mask"] = inputs["images_seq_mask"].long()
    with torch.no_grad():
        logits = model(**inputs, sft_format=["a", "b", "c"], seq_lens=[1, 2, 3], use_cache=False).logits
    assert_close(logits[:, -1], model_case(variant, "10_batch_three")[1]["prefill_last_logits"], **LOGIT_TOL)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rows, length", [(3, 40), (8, 1)])  # a prompt batch; a decode step of 8 rows
def test_grouped_moe_equals_reference_path(load_model, variant: str, rows: int, length: int) -> None:
    """The grouped expert dispatch gives the straightforward per-expert path's output, also in training mode."""
    moe = load_model(variant).language.model.layers[2].mlp
    x = torch.randn(rows, length, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = moe(x)
        moe.reference = True
        try:
            slow = moe(x)
        finally:
            moe.reference = False
    assert_close(fast, slow, atol=1e-6, rtol=1e-6, name="moe")


def test_vision_tile_batches_do_not_change_features(load_model, monkeypatch) -> None:
    model = load_model("tiny")
    images = official_inputs("01_single_image_grounding")["images"][0, :7]
    with torch.no_grad():
        whole = model.encode_tiles(images)
        monkeypatch.setattr(model, "vision_batch_size", 3)
        split = model.encode_tiles(images)
    assert_close(split, whole, atol=1e-6, rtol=1e-5, name="tile batches")


def test_in_place_gelu_gives_the_recorded_paths_features(load_model) -> None:
    """Where no gradient flows the vision MLP's GELU runs in place; the features are bitwise the recorded path's."""
    model = load_model("tiny")
    images = official_inputs("01_single_image_grounding")["images"][0, :3]
    with torch.no_grad():
        in_place = model.encode_tiles(images)
    tower = [*model.vision.parameters(), *model.projector.parameters()]
    with torch.enable_grad():
        recorded = model.encode_tiles(images)
        (grad,) = torch.autograd.grad(recorded.sum(), model.vision.blocks[0].mlp.fc1.weight)
        try:
            for p in tower:
                p.requires_grad_(False)
            frozen = model.encode_tiles(images)  # a frozen tower in training: nothing to record
        finally:
            for p in tower:
                p.requires_grad_(True)
    assert recorded.requires_grad and not frozen.requires_grad and bool(grad.abs().sum() > 0)
    assert torch.equal(in_place, frozen) and torch.equal(in_place, recorded.detach())


def test_cpu_vision_passes_stay_under_the_reusable_block_size() -> None:
    """The real SigLIP (729 patches, MLP 4304 wide): 1 tile per CPU pass in fp32, 2 in bf16; elsewhere all at once."""
    from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM

    with torch.device("meta"):
        model = DeepseekVLV2ForCausalLM(DeepseekVLV2Config.from_pretrained(GOLDEN / "real" / "deepseek-vl2"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model.tiles_per_pass(cpu, torch.float32) == 1
    assert model.tiles_per_pass(cpu, torch.bfloat16) == 2
    assert model.tiles_per_pass(cuda, torch.bfloat16) == model.vision_batch_size == 32
