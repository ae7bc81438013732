"""Adapters out of training: merged into the base weights at load time, or written out as a full checkpoint.

Merging (peft ``merge_and_unload``) gives back plain ``nn.Linear`` layers under the official names, so a merged
folder has exactly the base checkpoint's keys, shapes and config and loads unchanged here and in the official code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from deepseek_vl.models.processing import PROCESSOR_CONFIG_NAME, TOKENIZER_FILES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROCESSOR_FILES = (PROCESSOR_CONFIG_NAME, "special_tokens_map.json", *TOKENIZER_FILES)  # as a released model has


def check_adapter_folder(adapter: str | os.PathLike) -> Path:
    """The adapter folder, or an error saying what the folder is instead (missing, a full model, an unfinished run)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(adapter).expanduser()
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    if (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is a full model checkpoint (a base model, or the output of 'finetune --method full' or "
            f"'merge'), not a LoRA adapter: it needs no merging; load it as the model itself (--model {folder})"
        )
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is not None and Path(last, ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} holds no adapter yet (its run did not finish); its latest checkpoint, {last}, is one"
        )
    what = "it does not exist" if not folder.exists() else f"no {ADAPTER_CONFIG}"
    raise FileNotFoundError(
        f"{str(folder)!r} is not a LoRA adapter folder ({what}); pass the --output folder of 'deepseek-vl2 finetune' "
        "or one of its checkpoint-N folders"
    )


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
    check_adapter_fits(model, folder)
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


def check_adapter_fits(model: nn.Module, adapter: str | os.PathLike) -> None:
    """Every adapter tensor must fit a layer of this model: one trained on another size (Tiny vs Small, ...) names
    its base instead of failing deep in peft with a bare "size mismatch"."""
    from safetensors import safe_open

    folder = check_adapter_folder(adapter)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        return  # peft itself says which weights file is missing
    modules, parameters = dict(model.named_modules()), dict(model.named_parameters())
    misfits = []
    with safe_open(folder / ADAPTER_WEIGHTS, "pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is not iterable)
            name, shape = key.removeprefix(PEFT_PREFIX), tuple(weights.get_slice(key).get_shape())
            if ".lora_A." in name or ".lora_B." in name:  # A is (rank, in_features), B (out_features, rank)
                is_a = ".lora_A." in name
                layer = modules.get(name.split(".lora_A." if is_a else ".lora_B.")[0])
                wants, got = getattr(layer, "in_features" if is_a else "out_features", None), shape[1 if is_a else 0]
            else:  # a fully trained module's weight, saved whole
                parameter = parameters.get(name)
                wants, got = (None if parameter is None else tuple(parameter.shape)), shape
            if wants != got:
                misfits.append(f"{name} {got} (this model: {'no such layer' if wants is None else wants})")
    if misfits:
        trained_on = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        raise ValueError(
            f"the adapter {str(folder)!r} was trained on {trained_on or 'another model'}, not this model: "
            f"{len(misfits)} of its tensors do not fit, e.g. {misfits[0]}; load it with the model it was trained on"
        )


def merge_to_checkpoint(
    adapter: str | os.PathLike, output: str | os.PathLike, model: str | None = None, dtype: str = "auto"
) -> Path:
    """Write base + adapter as a full checkpoint folder (weights, config, and the base's processor and tokenizer files).

    The merge runs in float32; ``dtype`` "auto" saves in the base checkpoint's own dtype (bf16 for the released ones).
    """
    from deepseek_vl.chat import resolve_model_folder
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file; give a new folder for the merged checkpoint")
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"--output {str(output)!r} is not empty; choose a new folder for the merged checkpoint")
    base = resolve_model_folder(model or base_model_of(adapter))
    network = DeepseekVLV2ForCausalLM.from_pretrained(base, dtype=torch.float32)
    saved_dtype = checkpoint_dtype(base) if dtype == "auto" else getattr(torch, dtype)
    merged = merge_adapter(network, adapter).to(saved_dtype)
    merged.save_pretrained(output)
    add_official_dtype_key(output / "config.json", saved_dtype)
    for name in PROCESSOR_FILES:  # as released: saving them again would write transformers 5's tokenizer format
        if (Path(base) / name).is_file():
            shutil.copyfile(Path(base) / name, output / name)
    return output


def checkpoint_dtype(folder: str | os.PathLike) -> torch.dtype:
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return getattr(torch, name)


def add_official_dtype_key(config_file: Path, dtype: torch.dtype) -> None:
    """transformers 5 writes ``dtype``; the official code (transformers 4.38) reads ``torch_dtype``: write both. The
    sub-configs' ``dtype`` is the float32 of the merge: the saved one instead."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    config.setdefault("language_config", {})["torch_dtype"] = name
    for section in (config, *(value for value in config.values() if isinstance(value, dict))):
        if "dtype" in section:
            section["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
