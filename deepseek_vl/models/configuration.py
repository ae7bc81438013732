"""Configuration of DeepSeek-VL2, read unchanged from the official nested ``config.json``.

The official checkpoints omit every key whose value equals the default of the official
``DeepseekV2Config`` / vision / projector classes, so the defaults below are those defaults,
not transformers' DeepSeek-V2 ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig

ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
PROJECTOR_TYPES = ("identity", "linear", "mlp_gelu", "downsample_mlp_gelu")


# The official vision tower takes its shape from this table by `model_name`; a config.json key overrides it.
SIGLIP_PRESETS = {
    "siglip_so400m_patch14_384": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4),
}


class DeepseekVLV2VisionConfig(PreTrainedConfig):
    """SigLIP ViT of the vision tower (timm ``VisionTransformer`` layout, MAP head unused).

    Shape fields left out of config.json come from the preset named by ``model_name``, as the official
    ``create_siglip_vit`` builds them; the released checkpoints spell them all out anyway.
    """

    model_type = "vision"

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 384
    patch_size: int | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    mlp_ratio: float | None = None
    global_pool: str = "map"
    ignore_head: bool = True
    class_token: bool = False
    num_classes: int = 0
    use_checkpoint: bool = False
    weight_init: str = "skip"
    deterministic: bool = False
    num_recomputing_layers: int = 0

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        preset = SIGLIP_PRESETS.get(self.model_name, {})
        for name in ("patch_size", "width", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) is None:
                if name not in preset:
                    raise ValueError(
                        f"vision_config.{name} is missing and model_name {self.model_name!r} is not one of "
                        f"{sorted(SIGLIP_PRESETS)}: give {name} in config.json"
                    )
                setattr(self, name, preset[name])
        if self.patch_size > self.image_size:
            raise ValueError(f"vision_config.patch_size ({self.patch_size}) exceeds image_size ({self.image_size})")
        if self.width % self.heads:
            raise ValueError(f"vision_config.width ({self.width}) must be divisible by heads ({self.heads})")


class DeepseekVLV2ProjectorConfig(PreTrainedConfig):
    """MLP that maps vision features to the language model's embedding width."""

    model_type = "mlp_projector"

    projector_type: str = "downsample_mlp_gelu"
    input_dim: int = 1152
    n_embed: int = 2048
    depth: int = 2
    mlp_ratio: int = 1
    downsample_ratio: int = 2
    token_pooling: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"projector_config.projector_type {self.projector_type!r} is not supported; use one of {PROJECTOR_TYPES}"
            )
        if self.token_pooling:
            raise ValueError("projector_config.token_pooling is not used by any DeepSeek-VL2 checkpoint and is not supported")


class DeepseekV2Config(PreTrainedConfig):
    """DeepSeekMoE language model: MLA or MHA attention, shared + routed experts."""

    model_type = "deepseek_v2"

    vocab_size: int = 102400
    hidden_size: int = 4096
    intermediate_size: int = 11008
    moe_intermediate_size: int = 1407
    num_hidden_layers: int = 30
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int | None = 64
    v_head_dim: int | None = 128
    qk_nope_head_dim: int | None = 128
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    num_experts_per_tok: int | None = None
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # Shadows transformers' deprecated ``rope_scaling`` property: the official dict is used as is.
    rope_scaling: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    use_mla: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.use_mla:
            self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"language_config.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads}) when use_mla is false"
            )
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"language_config.topk_method {self.topk_method!r} is not one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"language_config.scoring_func {self.scoring_func!r} is not one of {SCORING_FUNCS}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES or "factor" not in self.rope_scaling:
                raise ValueError(
                    f"language_config.rope_scaling {self.rope_scaling!r} needs a 'type' in {ROPE_SCALING_TYPES} "
                    "and a 'factor'"
                )
        if self.n_routed_experts and self.n_group and self.n_routed_experts % self.n_group:
            raise ValueError(
                f"language_config.n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekVLV2Config(PreTrainedConfig):
    """The whole model: vision tower, projector, DeepSeekMoE language model and the tiling layout."""

    model_type = "deepseek_vl_v2"
    sub_configs_defaults: ClassVar = {
        "vision_config": DeepseekVLV2VisionConfig,
        "projector_config": DeepseekVLV2ProjectorConfig,
        "language_config": DeepseekV2Config,
    }

    vision_config: dict | DeepseekVLV2VisionConfig | None = None
    projector_config: dict | DeepseekVLV2ProjectorConfig | None = None
    language_config: dict | DeepseekV2Config | None = None
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    candidate_resolutions: list | tuple = ((384, 384),)

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.tile_tag != "2D":
            raise ValueError(f"tile_tag {self.tile_tag!r} is not supported: every DeepSeek-VL2 checkpoint uses '2D'")
        if self.global_view_pos not in ("head", "tail"):
            raise ValueError(f"global_view_pos must be 'head' or 'tail', got {self.global_view_pos!r}")
        if self.projector_config.n_embed != self.language_config.hidden_size:
            raise ValueError(
                f"projector_config.n_embed ({self.projector_config.n_embed}) must equal "
                f"language_config.hidden_size ({self.language_config.hidden_size})"
            )

    def get_text_config(self, *args: Any, **kwargs: Any) -> DeepseekV2Config:
        return self.language_config
