"""Loading a checkpoint into another dtype without a second copy of it in memory.

transformers maps the safetensors files and casts each tensor into the model; the mapped pages it reads stay in
the process's resident set until loading ends, so a bf16 checkpoint loaded as float32 peaks at the float32
model plus the whole file (1.5x the loaded model). Loading at the stored dtype instead keeps the weights as
views of the mapping (no copy), and casting them one by one afterwards lets each tensor's pages be released
as soon as it is cast: the peak is the loaded model plus one tensor.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "HUB_KEYWORDS",
    "cast_releasing_pages",
    "checkpoint_files",
    "load_at_stored_dtype",
    "safetensors_files",
    "stored_dtype",
]

# from_pretrained's keywords for a Hub repo id, passed on to every lookup.
HUB_KEYWORDS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MADV_DONTNEED = 4


def load_at_stored_dtype(path: str | os.PathLike, kwargs: dict) -> torch.dtype | None:
    """For a CPU load into a dtype other than the one every tensor of the checkpoint is stored in: switch
    ``kwargs`` to the stored dtype and return the requested one (for ``cast_releasing_pages``); else None (also for a
    ``variant``, whose files are not the ones read here)."""
    requested = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(requested, str) and requested != "auto":
        requested = getattr(torch, requested, None)
    if (
        not isinstance(requested, torch.dtype)
        or kwargs.get("device_map") not in (None, "cpu")
        or any(kwargs.get(key) is not None for key in ("quantization_config", "state_dict", "gguf_file", "variant"))
    ):
        return None
    hub = {key: kwargs[key] for key in HUB_KEYWORDS if key in kwargs}
    stored = stored_dtype(path, **hub)
    if stored is None or stored == requested:
        return None
    kwargs.pop("torch_dtype", None)
    kwargs["dtype"] = stored
    return requested


def stored_dtype(path: str | os.PathLike, **hub) -> torch.dtype | None:
    """The one floating dtype of every tensor of the checkpoint's safetensors files, else None (mixed or not found)."""
    files = safetensors_files(path, **hub)
    dtypes = set()
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        dtypes |= {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}
    floating = {_SAFETENSORS_DTYPES.get(name) for name in dtypes if name.startswith(("F", "BF"))}
    return floating.pop() if files and len(floating) == 1 and None not in floating else None


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a local checkpoint folder (its index's shards, else model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors(.index.json) in {folder}")


def safetensors_files(path: str | os.PathLike, subfolder: str = "", **hub) -> list[Path]:
    """The checkpoint's safetensors files, local or already in the Hub cache (nothing is downloaded here)."""
    local = Path(path) / subfolder
    if local.is_dir():
        try:
            return checkpoint_files(local)
        except FileNotFoundError:
            return []
    # Imported here: importing transformers imports deepseek_vl.models, which imports this module.
    from transformers.utils import cached_file

    hub = {k: v for k, v in hub.items() if k in ("revision", "token", "cache_dir")}

    def find(name: str) -> Path | None:
        try:
            found = cached_file(str(path), name, subfolder=subfolder, local_files_only=True,
                                _raise_exceptions_for_missing_entries=False, **hub)  # fmt: skip
        except OSError:
            return None
        return Path(found) if found else None

    single = find("model.safetensors")
    if single is not None:
        return [single]
    index = find("model.safetensors.index.json")
    if index is None:
        return []
    shards = [find(name) for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return shards if all(shards) else []


def cast_releasing_pages(model: nn.Module, dtype: torch.dtype, files: Iterable[Path] = ()) -> None:
    """``model.to(dtype)`` for the floating parameters and buffers, one tensor at a time, releasing each source's
    pages of a mapped checkpoint file (``files``, or any .safetensors file) as soon as it is cast (they stay in the
    page cache, not in this process)."""
    release = _page_releaser(files)
    seen: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is None or id(tensor) in seen or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                seen.add(id(tensor))
                source = tensor.data
                tensor.data = source.to(dtype)
                release(source)
    for config in (model.config, *(getattr(model.config, name) for name in model.config.sub_configs)):
        config.dtype = dtype


def _page_releaser(files: Iterable[Path] = ()):
    """madvise(MADV_DONTNEED) over the whole pages of a cast tensor that lie in a mapping of a .safetensors file or
    of one of ``files``: a checkpoint in the Hub cache is mapped through its blob, a file named by its hash.

    Only there: on anonymous memory it would zero data, while file pages are read again from the file if ever
    touched (the source tensor is no longer used by the model; the pages are whole pages of it alone). A no-op
    off Linux.
    """
    if not sys.platform.startswith("linux"):
        return lambda tensor: None
    checkpoint = {os.path.realpath(file) for file in files}
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and (fields[5].endswith(".safetensors") or fields[5] in checkpoint):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((start, end))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = os.sysconf("SC_PAGE_SIZE")

    def release(tensor: torch.Tensor) -> None:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return
        first = tensor.data_ptr()
        last = first + tensor.numel() * tensor.element_size()
        start, end = -(-first // page) * page, last // page * page
        if end > start and any(lo <= start and end <= hi for lo, hi in mapped):
            libc.madvise(start, end - start, _MADV_DONTNEED)

    return release
