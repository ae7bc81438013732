"""Vision tower (SigLIP ViT, built by timm) and the MLP projector of DeepSeek-VL2.

The official vision tower is a copy of timm's ``VisionTransformer`` with the SigLIP settings
(tanh-GELU, LayerNorm eps 1e-6, MAP head), so timm builds it with the checkpoint's own weight
names (``vision.blocks.N.attn.qkv`` ...). The MAP head (``vision.attn_pool``) is in the
checkpoint but never used: features are taken after the final LayerNorm.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .configuration import DeepseekVLV2ProjectorConfig, DeepseekVLV2VisionConfig


class TanhGELU(nn.GELU):
    """SigLIP's tanh GELU, computed in place on the MLP's hidden layer when no gradient flows through it.

    The same kernel, so the same values; inference (and a frozen tower in training) then allocates no second
    hidden-layer-sized buffer per block (12.5 MB per tile in fp32), which on CPU is fresh memory the system must
    fault in and zero on every pass. The input is always the MLP's fresh ``fc1`` output, read by nothing else.
    """

    def __init__(self) -> None:
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return super().forward(x)
        return torch.ops.aten.gelu_(x, approximate="tanh")


class SiglipVisionTower(VisionTransformer):
    """timm ViT that returns patch features (B, N, C) after the final norm, never the pooled head."""

    def __init__(self, config: DeepseekVLV2VisionConfig) -> None:
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.width,
            depth=config.layers,
            num_heads=config.heads,
            mlp_ratio=config.mlp_ratio,
            class_token=config.class_token,
            global_pool=config.global_pool,
            num_classes=0,
            act_layer=TanhGELU,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            weight_init="skip",
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.forward_features(pixel_values)

    @property
    def gradient_checkpointing(self) -> bool:
        """The flag transformers' ``gradient_checkpointing_enable`` sets: it drives timm's per-block checkpointing."""
        return self.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.set_grad_checkpointing(enable)


class MlpProjector(nn.Module):
    """Maps vision features to language embeddings; ``downsample_mlp_gelu`` merges 2x2 patches first."""

    def __init__(self, config: DeepseekVLV2ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        kind, width = config.projector_type, config.n_embed
        if kind == "identity":
            self.layers = nn.Identity()
        elif kind == "linear":
            self.layers = nn.Linear(config.input_dim, width)
        elif kind == "mlp_gelu":
            modules: list[nn.Module] = [nn.Linear(config.input_dim, width)]
            for _ in range(1, config.depth):
                modules += [nn.GELU(), nn.Linear(width, width)]
            self.layers = nn.Sequential(*modules)
        else:  # downsample_mlp_gelu
            hidden = width * config.mlp_ratio
            modules = [nn.Linear(config.input_dim * config.downsample_ratio**2, hidden)]
            for _ in range(1, config.depth - 1):
                modules += [nn.GELU(), nn.Linear(hidden, hidden)]
            modules += [nn.GELU(), nn.Linear(hidden, width)]
            self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.projector_type == "downsample_mlp_gelu":
            x = self.downsample(x)
        return self.layers(x)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad the square patch grid to a multiple of the ratio, then concatenate each r x r block."""
        ratio = self.config.downsample_ratio
        batch, hw, dim = x.shape
        side = int(hw**0.5)
        pad = -side % ratio
        x = x.view(batch, side, side, dim)
        x = F.pad(x, (0, 0, 0, pad, 0, pad))  # (B, side+pad, side+pad, C), padded bottom/right
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W)
        x = F.unfold(x, kernel_size=ratio, stride=ratio)  # (B, C*r*r, H*W/r^2), channel-major
        return x.transpose(1, 2)  # (B, H*W/r^2, C*r*r)
