"""Parts of the language model that no golden checkpoint exercises: RoPE scalings, group-limited routing, sharded weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseek_vl.models import DeepseekV2Config, DeepseekVLV2ForCausalLM
from deepseek_vl.models.language import DeepseekV2ForCausalLM, DeepseekV2MLA, DeepseekV2RotaryEmbedding, MoEGate

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
             qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64)  # fmt: skip


def yarn_reference(dim: int, base: float, factor: float, original: int, positions: np.ndarray) -> np.ndarray:
    """YaRN cos table written from the paper's definitions (arXiv:2309.00071), in float64."""
    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction(32)), 0), min(math.ceil(correction(1)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    theta = base ** -(np.arange(0, dim, 2) / dim)
    inv_freq = theta / factor * ramp + theta * (1 - ramp)
    angles = positions[:, None] * inv_freq
    return np.cos(np.concatenate([angles, angles], axis=-1))


def test_yarn_rope_and_softmax_scale() -> None:
    scaling = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "mscale": 0.707,
               "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    config = DeepseekV2Config(**SMALL, rope_scaling=scaling)
    positions = torch.arange(0, 5000, 499)[None]
    cos, _ = DeepseekV2RotaryEmbedding(config, 64)(positions, torch.float64)
    expected = yarn_reference(64, 10000.0, 40, 4096, positions[0].double().numpy())
    np.testing.assert_allclose(cos[0].numpy(), expected, atol=2e-4)  # mscale / mscale_all_dim = 1 here
    attention = DeepseekV2MLA(config, 0)
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert attention.scale == pytest.approx(12**-0.5 * mscale**2)


def test_linear_and_dynamic_rope() -> None:
    linear = DeepseekV2RotaryEmbedding(DeepseekV2Config(**SMALL, rope_scaling={"type": "linear", "factor": 4}), 8)
    plain = DeepseekV2RotaryEmbedding(DeepseekV2Config(**SMALL), 8)
    assert torch.allclose(linear(torch.tensor([[40]]), torch.float32)[0], plain(torch.tensor([[10]]), torch.float32)[0])
    dynamic = DeepseekV2RotaryEmbedding(DeepseekV2Config(**SMALL, rope_scaling={"type": "dynamic", "factor": 2}), 8)
    inside = torch.arange(64)[None]
    assert torch.equal(dynamic(inside, torch.float32)[0], plain(inside, torch.float32)[0])
    beyond = torch.arange(100)[None]  # past max_position_embeddings the base grows, frequencies fall
    assert not torch.allclose(dynamic(beyond, torch.float32)[0], plain(beyond, torch.float32)[0])


def test_unknown_rope_scaling_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="rope_scaling"):
        DeepseekV2Config(**SMALL, rope_scaling={"type": "ntk-by-parts"})


def test_group_limited_greedy_routes_inside_the_best_groups() -> None:
    config = DeepseekV2Config(**{**SMALL, "n_group": 4, "topk_group": 1, "topk_method": "group_limited_greedy"})
    gate = MoEGate(config)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    idx, weight = gate(x)
    scores = torch.softmax(x @ gate.weight.T, dim=-1)
    best_group = scores.view(50, 4, 2).amax(-1).argmax(-1)
    assert torch.equal(idx // 2, best_group[:, None].expand(-1, 2))
    assert torch.allclose(weight, scores.gather(1, idx))


def test_q_lora_attention_runs_with_cache() -> None:
    """Layouts with q_lora_rank (DeepSeek-V2 full size) decode with the cache like a full forward."""
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**SMALL)).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        first = model(input_ids=ids[:, :5], use_cache=True)
        steps = [model(input_ids=ids[:, i : i + 1], cache=first.cache, use_cache=True).logits for i in range(5, 9)]
    assert torch.allclose(torch.cat([first.logits, *steps], dim=1), full, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("use_mla", [True, False])
@pytest.mark.parametrize("length", [8, 24])  # MLA: absorbed (<= 16 queries) and decompressed attention
def test_attention_dropout_applies_in_training_only(attn_implementation: str, use_mla: bool, length: int) -> None:
    """``attention_dropout`` drops attention probabilities in training, as the official layers do, and nothing else."""
    torch.manual_seed(0)
    config = DeepseekV2Config(**SMALL, use_mla=use_mla, attention_dropout=0.5)
    config._attn_implementation = attn_implementation
    model = DeepseekV2ForCausalLM(config)
    ids = torch.randint(0, 64, (2, length))

    def logits(p: float, training: bool, seed: int = 0) -> torch.Tensor:
        config.attention_dropout = p
        model.train(training)
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    assert not torch.allclose(logits(0.5, True), logits(0.0, True), atol=1e-3)
    assert torch.equal(logits(0.5, True, seed=1), logits(0.5, True, seed=1))
    assert torch.equal(logits(0.5, False), logits(0.0, False))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_unmerged_lora_on_kv_b_proj_decodes_as_the_merged_model(attn_implementation: str) -> None:
    """The absorbed decode reads kv_b_proj's weight, which under peft is the base weight without the adapter's update."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = DeepseekV2Config(**SMALL)
    config._attn_implementation = attn_implementation
    model = peft.get_peft_model(DeepseekV2ForCausalLM(config), peft.LoraConfig(r=4, target_modules=["kv_b_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert torch.allclose(unmerged, merged, atol=1e-5) and not torch.allclose(unmerged, base, atol=1e-3)


def test_sharded_checkpoint_loads(load_model, tmp_path: Path) -> None:
    model = load_model("tiny")
    model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    reloaded = DeepseekVLV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[0, 19923, 14, 2058, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_vision_shape_comes_from_the_named_preset_unless_given() -> None:
    from deepseek_vl.models import DeepseekVLV2VisionConfig

    so400m = DeepseekVLV2VisionConfig(model_name="siglip_so400m_patch14_384")
    assert (so400m.patch_size, so400m.width, so400m.layers, so400m.heads, so400m.mlp_ratio) == (14, 1152, 27, 16, 3.7362)
    default = DeepseekVLV2VisionConfig()  # the official default model_name
    assert (default.patch_size, default.width, default.layers) == (16, 1024, 24)
    given = DeepseekVLV2VisionConfig(model_name="siglip_so400m_patch14_384", width=64, layers=2, heads=4)
    assert (given.width, given.layers, given.heads, given.patch_size) == (64, 2, 4, 14)
    with pytest.raises(ValueError, match="vision_config.patch_size is missing"):
        DeepseekVLV2VisionConfig(model_name="my_vit")


@pytest.mark.parametrize(
    ("projector_type", "keys"),
    [
        ("identity", set()),
        ("linear", {"layers.weight", "layers.bias"}),
        ("mlp_gelu", {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}),
        ("downsample_mlp_gelu", {"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"}),
    ],
)
def test_projector_types(projector_type: str, keys: set[str]) -> None:
    from deepseek_vl.models import DeepseekVLV2ProjectorConfig
    from deepseek_vl.models.vision import MlpProjector

    width = 8 if projector_type == "identity" else 16
    projector = MlpProjector(DeepseekVLV2ProjectorConfig(projector_type=projector_type, input_dim=8, n_embed=width))
    assert set(projector.state_dict()) == keys
    tokens = 196 if projector_type == "downsample_mlp_gelu" else 729
    assert projector(torch.randn(2, 729, 8)).shape == (2, tokens, width)


def test_global_view_tail_puts_local_tiles_first(load_model, monkeypatch) -> None:
    model = load_model("tiny")
    features = torch.randn(1 + 2 * 3, 196, 16)
    head = model.tile_layout(features, 2, 3)
    monkeypatch.setattr(model.config, "global_view_pos", "tail")
    tail = model.tile_layout(features, 2, 3)
    global_tokens = 14 * 15
    assert torch.equal(tail[-global_tokens:], head[:global_tokens])  # global view (with its newlines) last
    assert torch.equal(tail[-global_tokens - 1], model.view_seperator.detach())
    assert torch.equal(tail[: -global_tokens - 1], head[global_tokens + 1 :])
