"""What trains: LoRA targets named after the checkpoint keys, and which parts stay frozen.

The default LoRA preset is MoE-aware: the attention projections (``q_proj`` or ``q_a_proj``/``q_b_proj``,
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``; Tiny's ``k_proj``/``v_proj``), the dense MLP of the first
layers and the shared experts. The routed experts (most of the parameters, each seeing only its share of the
tokens) and the router are left out unless asked for; the vision tower and projector are frozen by default.

Always frozen: the unused MAP head of the vision tower (``vision.attn_pool``) and the Base router's
``e_score_correction_bias``, which only picks experts (no gradient reaches it; the official code cannot train
``noaux_tc`` at all).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
VISION = (r"attn\.qkv", r"attn\.proj", r"mlp\.fc1", r"mlp\.fc2")
LAYER = r"language\.model\.layers\.\d+"


@dataclass
class TrainableParts:
    """Which parts train besides the LoRA targets (or, for full fine-tuning, besides the language model)."""

    lora_experts: bool = False  # LoRA (full: training) on every routed expert
    train_router: bool = False  # the MoE routers (mlp.gate.weight), fully
    lora_vision: bool = False  # LoRA on the vision tower's blocks
    train_vision: bool = False  # the vision tower, fully
    train_projector: bool = False  # the projector, fully (full fine-tuning: image_newline and view_seperator too)


def lora_target_regex(parts: TrainableParts) -> str:
    """peft ``target_modules`` as one regex over module names (peft matches it against the whole name)."""
    patterns = [
        rf"{LAYER}\.self_attn\.({'|'.join(ATTENTION)})",
        rf"{LAYER}\.mlp\.(shared_experts\.)?({'|'.join(MLP)})",  # dense MLP of the first layers, shared experts
    ]
    if parts.lora_experts:
        patterns.append(rf"{LAYER}\.mlp\.experts\.\d+\.({'|'.join(MLP)})")
    if parts.lora_vision:
        patterns.append(rf"vision\.blocks\.\d+\.({'|'.join(VISION)})")
    return "|".join(f"({pattern})" for pattern in patterns)


def fully_trained_modules(parts: TrainableParts) -> list[str]:
    """peft ``modules_to_save``: modules trained in full beside the adapter and saved with it."""
    modules = ["gate"] if parts.train_router else []
    if parts.train_projector:
        modules.append("projector")
    if parts.train_vision:
        modules.append("vision")
    return modules


def apply_lora(model: nn.Module, parts: TrainableParts, rank: int = 16, alpha: int = 32, dropout: float = 0.05):
    """Wrap the model with a peft LoRA adapter on the preset's targets; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=lora_target_regex(parts),
        modules_to_save=fully_trained_modules(parts) or None,
    )
    model = get_peft_model(model, config)
    freeze_never_trained(model)
    return model


def prepare_full(model: nn.Module, parts: TrainableParts) -> nn.Module:
    """Full fine-tuning: the language model trains (routed experts and routers included unless left out)."""
    for name, parameter in model.named_parameters():
        if name.startswith("vision."):
            trains = parts.train_vision
        elif name.startswith("projector.") or name in ("image_newline", "view_seperator"):
            trains = parts.train_projector
        else:
            trains = True
        parameter.requires_grad_(trains)
    freeze_never_trained(model)
    return model


def freeze_never_trained(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if ".attn_pool." in name or name.endswith("e_score_correction_bias"):
            parameter.requires_grad_(False)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the model as it runs: a 4-bit weight (QLoRA) counts its weights, not
    the bytes that pack two of them, and peft's frozen originals of fully trained modules (kept for unloading the
    adapter) are not counted beside their trained copies."""
    trainable = total = 0
    for name, parameter in model.named_parameters():
        if ".original_module." in name:
            continue
        count = parameter.numel()
        if type(parameter).__name__ == "Params4bit":  # bitsandbytes: two 4-bit weights per byte of its storage
            count *= 2 * parameter.element_size()
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total
