"""Access to ../shared/golden: the official implementation's outputs that the tests compare against."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(os.environ.get("DEEPSEEK_VL_GOLDEN", Path(__file__).resolve().parents[1].parent / "shared" / "golden"))
VARIANTS = ("tiny", "small", "base")


def checkpoint(variant: str) -> Path:
    return GOLDEN / "checkpoints" / f"vl2-{variant}-random"


@cache
def processor_case(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = GOLDEN / "processor" / case
    return json.loads(path.with_suffix(".json").read_text()), load_file(str(path.with_suffix(".safetensors")))


@cache
def model_case(variant: str, case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    path = GOLDEN / "model" / f"vl2-{variant}-random" / case
    return json.loads(path.with_suffix(".json").read_text()), load_file(str(path.with_suffix(".safetensors")))


def official_images(case: str) -> torch.Tensor:
    """Rebuild the official float images tensor from the uint8 tiles (recipe of the golden README)."""
    info, tensors = processor_case(case)
    images = torch.zeros(tensors["images_shape"].tolist())
    for row, refs in enumerate(info["outputs"]["images_tiles"]):
        if refs:
            tiles = torch.cat([load_file(str(GOLDEN / "processor" / "tiles" / f"{ref}.safetensors"))["tiles"] for ref in refs])
            images[row, : len(tiles)] = tiles.float() / 255 * 2 - 1
    return images


def official_inputs(case: str) -> dict[str, torch.Tensor]:
    """The model inputs of a processor golden, exactly as the official processor produced them."""
    _, tensors = processor_case(case)
    return {
        "input_ids": tensors["input_ids"],
        "attention_mask": tensors["attention_mask"],
        "images": official_images(case),
        "images_seq_mask": tensors["images_seq_mask"].bool(),
        "images_spatial_crop": tensors["images_spatial_crop"],
    }


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """|a - b| <= atol + rtol*|b| elementwise (the golden README's criterion), with the worst offender on failure."""
    actual, expected = actual.detach().float().cpu(), expected.float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    worst = excess.flatten().nan_to_num(float("inf")).argmax()
    assert bool((excess <= 0).all()), (
        f"{name}: {int((excess > 0).sum())} values out of tolerance; worst at flat index {int(worst)}: "
        f"{actual.flatten()[worst].item()} vs {expected.flatten()[worst].item()}"
    )


def widened_checkpoint(variant: str, folder: Path, **widths: int) -> str:
    """The golden architecture (heads, experts, routing unchanged) with the language ``widths`` given (the projector
    follows ``hidden_size``), saved in bf16 with the processor files: quantized formats need widths the 16-wide goldens
    lack. Golden weights where a shape is unchanged, scaled random ones elsewhere."""
    from shutil import copyfile

    from torch import nn

    from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
    from deepseek_vl.train.merge import PROCESSOR_FILES

    config = DeepseekVLV2Config.from_pretrained(checkpoint(variant))
    for key, value in widths.items():
        setattr(config.language_config, key, value)
    config.projector_config.n_embed = config.language_config.hidden_size
    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM(config)
    golden = load_file(str(checkpoint(variant) / "model.safetensors"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in golden and golden[name].shape == param.shape:
                param.copy_(golden[name])
            elif param.dim() >= 2:
                nn.init.normal_(param, std=param[0].numel() ** -0.5)
            elif "norm" in name:
                nn.init.ones_(param)
            else:
                nn.init.normal_(param, std=param.numel() ** -0.5 if "bias" not in name else 0.0)
    model.to(torch.bfloat16).save_pretrained(folder)
    for name in PROCESSOR_FILES:
        copyfile(checkpoint(variant) / name, Path(folder) / name)
    return str(folder)
