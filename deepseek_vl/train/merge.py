"""Adapters out of training: merged into the base weights at load time, or written out as a full checkpoint.

Merging (peft ``merge_and_unload``) gives back plain ``nn.Linear`` layers under the official names, so a merged
folder has exactly the base checkpoint's keys, shapes and config and loads unchanged here and in the official code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"


def check_adapter_folder(adapter: str | os.PathLike) -> Path:
    folder = Path(adapter).expanduser()
    if not (folder / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); pass the --output folder of "
            "'deepseek-vl2 finetune' or one of its checkpoint-N folders"
        )
    return folder


def base_model_of(adapter: str | os.PathLike) -> str:
    """The base checkpoint an adapter was trained on, as recorded in its adapter_config.json."""
    config = json.loads((check_adapter_folder(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter}/{ADAPTER_CONFIG} does not name its base model; pass --model")
    return base


def merge_adapter(model: nn.Module, adapter: str | os.PathLike) -> nn.Module:
    """The model with the adapter's LoRA deltas (and any fully trained modules) folded into its weights."""
    folder = check_adapter_folder(adapter)
    try:
        from peft import PeftModel
    except ImportError:
        raise ValueError("loading an adapter needs peft: pip install 'deepseek-vl2[train]'") from None
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def merge_to_checkpoint(
    adapter: str | os.PathLike, output: str | os.PathLike, model: str | None = None, dtype: str = "auto"
) -> Path:
    """Write base + adapter as a full checkpoint folder (weights, config, processor and tokenizer files).

    The merge runs in float32; ``dtype`` "auto" saves in the base checkpoint's own dtype (bf16 for the released ones).
    """
    from deepseek_vl.chat import resolve_model_folder
    from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

    base = resolve_model_folder(model or base_model_of(adapter))
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{str(output)!r} is not empty; choose a new folder for the merged checkpoint")
    network = DeepseekVLV2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    saved_dtype = checkpoint_dtype(base) if dtype == "auto" else getattr(torch, dtype)
    merged = merge_adapter(network, adapter).to(saved_dtype)
    merged.save_pretrained(output)
    add_official_dtype_key(output / "config.json", saved_dtype)
    processor_source = adapter if (Path(adapter) / "processor_config.json").is_file() else base
    DeepseekVLV2Processor.from_pretrained(processor_source).save_pretrained(output)
    return output


def checkpoint_dtype(folder: str | os.PathLike) -> torch.dtype:
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)


def add_official_dtype_key(config_file: Path, dtype: torch.dtype) -> None:
    """transformers 5 writes ``dtype``; the official code (transformers 4.38) reads ``torch_dtype``: write both."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    config.setdefault("language_config", {})["torch_dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
