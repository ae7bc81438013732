"""Checks of a local checkpoint folder's files, so that a missing, unreadable, damaged or foreign file is one
`ModelLoadError` naming the file and what to do, instead of a traceback from deep inside transformers.

Only headers and small JSON files are read: the checks cost milliseconds next to loading the weights.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from deepseek_vl.options import DEFAULT_MODEL, ModelLoadError

__all__ = ["check_model_folder", "damaged_json_file", "read_json_file"]

MODEL_TYPE = "deepseek_vl_v2"
TORCH_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # transformers loads these too
_REFETCH = "copy or download it again"


def read_json_file(path: Path) -> Any:
    """The parsed JSON of a checkpoint file, or a ModelLoadError saying which file is unreadable or damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise unreadable(path, error) from error
    except UnicodeDecodeError as error:
        raise ModelLoadError(f"{path} is not UTF-8 text (byte {error.start}): it is damaged; {_REFETCH}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{path} is not valid JSON ({error.msg}: line {error.lineno} column {error.colno}): the file is damaged "
            f"or truncated; {_REFETCH}"
        ) from error


def unreadable(path: Path, error: OSError) -> ModelLoadError:
    advice = " (check the file's permissions)" if isinstance(error, PermissionError) else ""
    return ModelLoadError(f"cannot read {path}: {error.strerror or error}{advice}")


def damaged_json_file(folder: Path, names: tuple[str, ...]) -> ModelLoadError | None:
    """The error for the first of these files in ``folder`` that is unreadable or not JSON; None if all are sound.

    For failures of third-party loaders (the tokenizer) whose own errors do not name the file they were reading.
    """
    for name in names:
        if (folder / name).exists():
            try:
                read_json_file(folder / name)
            except ModelLoadError as error:
                return error
    return None


def check_model_folder(folder: Path) -> None:
    """Raise a ModelLoadError naming the file if ``folder`` is not a readable, complete DeepSeek-VL2 checkpoint."""
    config_file = folder / "config.json"
    if not config_file.exists():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a model checkpoint folder: pass the folder that holds "
            "config.json, model.safetensors and the processor and tokenizer files"
        )
    config = read_json_file(config_file)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_file} must hold a JSON object, not {type(config).__name__}; {_REFETCH}")
    model_type = config.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ModelLoadError(
            f"{config_file} describes a {model_type!r} model, not DeepSeek-VL2 (model_type {MODEL_TYPE!r}): pass a "
            f"DeepSeek-VL2 checkpoint folder or Hub repo id such as {DEFAULT_MODEL}"
        )
    for file in weight_files(folder):
        check_safetensors(file)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the folder's index names (each must exist), else model.safetensors; [] for .bin weights."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.exists():
        index = read_json_file(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ModelLoadError(f"{index_file} has no weight_map of tensor names to shard files; {_REFETCH}")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.exists()]
        if missing:
            raise ModelLoadError(
                f"{folder} lacks {len(missing)} of the {len(files)} shards that {index_file.name} names "
                f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}): download all of them"
            )
        return files
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    if any((folder / name).exists() for name in TORCH_WEIGHTS):
        return []
    raise ModelLoadError(
        f"{folder} has a config.json but no weights (model.safetensors, or model.safetensors.index.json and its "
        "shards): copy or download them into the folder"
    )


def check_safetensors(file: Path) -> None:
    """Read the header of a safetensors file and check that the file holds every byte it describes."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            start = f.read(8)
            length = struct.unpack("<Q", start)[0] if len(start) == 8 else size
            raw = f.read(length) if length <= size - 8 else None
    except OSError as error:
        raise unreadable(file, error) from error
    if raw is None:
        raise ModelLoadError(
            f"{file} is truncated or not a safetensors file ({size} bytes, cut in its header); {_REFETCH}"
        )
    try:
        header = json.loads(raw)
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        needed = 8 + length + int(end)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError) as error:  # JSON and Unicode errors included
        raise ModelLoadError(f"{file} is not a valid safetensors file (its header is damaged); {_REFETCH}") from error
    if needed > size:
        raise ModelLoadError(f"{file} is truncated ({size} bytes of the {needed} its header describes); {_REFETCH}")
