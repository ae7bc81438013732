"""Weight-only int8 / int4 / nf4 quantization of DeepSeek-VL2's language model, applied while the weights load.

Decoding is memory-bound: every step reads every dense weight and the chosen experts once, so the bytes per
weight set the speed. ``int8`` (one scale per output channel) and ``int4`` (asymmetric, one scale and zero per
group of input channels) run on torch's own weight-only kernels, which read the packed integers directly on
CPU (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) and CUDA (``_weight_int8pack_mm``, tinygemm's
``_weight_int4pack_mm``). torchao 0.18's ``Int8WeightOnlyConfig`` converts the whole int8 weight to the
activation dtype on every call on CPU and its ``Int4WeightOnlyConfig`` has no CPU packing, so neither is faster
than bf16 there (``benchmarks/bench_quant.py``); its configs stay usable through transformers' ``TorchAoConfig``.
Layers whose shapes a kernel cannot run stay unquantized: int8 needs a multiple of 16 inputs (torch's CPU kernel
crashes on other bf16 rows; every real layer is one), int4 a multiple of 32 (128 on CUDA).
``nf4`` is bitsandbytes' 4-bit NormalFloat (blocks of 64 weights, CPU and CUDA), the base of QLoRA; layers whose
inputs are not a multiple of 64 stay unquantized (bitsandbytes 0.50.2 dequantizes them wrongly on CPU; the real
language layers all are multiples of 64, the narrow golden checkpoints' are not).

Quantized: the decoder layers' linears (attention projections, dense MLPs, shared and routed experts).
Kept in the model dtype: the vision tower and projector (unless ``quantize_vision``), router gates (top-k
choices are fragile), embeddings, ``lm_head`` (unless ``quantize_lm_head``: it is a third of a Tiny decode step's
bytes, so without it int8 / int4 can speed up Tiny's decoding at most 1.55x / 2.1x), norms, and ``kv_b_proj``, whose
weight the absorbed MLA decode reads per head (0.4% of Small's parameters).

Letters: N output features, K input features, G = K / group_size.
"""

from __future__ import annotations

import copy
import math
import os
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .utils.loading import HUB_KEYWORDS, checkpoint_files
from .utils.memory import malloc_trim

MODES = ("int8", "int4", "nf4")
MIN_BITSANDBYTES = "0.50"  # tested: 0.50.2, whose NF4 runs on CPU (AVX512-BF16 kernel or dequantize + matmul) and CUDA
NF4_BLOCK = 64  # bitsandbytes' default NF4 block (one absmax per 64 weights)
KERNEL_ALIGNMENT = 32  # bytes: see aligned
INT8_K_MULTIPLE = 16  # inputs: bf16 rows of 32 bytes, each on the boundary the int8 CPU kernel needs (see aligned)
INT4_GROUP_SIZES = (128, 64, 32)  # the CPU kernel accepts 32..256; the largest that divides K is used
LANGUAGE_LINEAR = re.compile(r"language\.model\.layers\.\d+\.(self_attn\.(?!kv_b_proj)\w+|mlp\.(experts\.\d+\.|shared_experts\.)?\w+_proj)$")
VISION_LINEAR = re.compile(r"(vision\.blocks\.\d+\.(attn|mlp)\.\w+|projector\.layers\.\d+)$")
# The same choice for transformers' own quantizers (TorchAoConfig, BitsAndBytesConfig) that leave it open.
KEEP_UNQUANTIZED = ["vision", "projector", "language.lm_head", r".*\.kv_b_proj"]
IGNORED_KEYWORDS = {"trust_remote_code", "low_cpu_mem_usage"}  # from_pretrained keywords that change nothing here


class Int8Linear(nn.Module):
    """``x @ W.T`` with W as int8, one scale per output channel (symmetric); the kernel reads the int8 bytes."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        weight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=self.weight_scale.dtype, device=w.device)
        for rows in row_chunks(*w.shape):  # bounded float32 temporaries, whatever the size (lm_head: 129280 rows)
            part = w[rows].to(torch.float32, copy=True)  # the steps below work in place on it
            part_scale = torch.linalg.vector_norm(part, float("inf"), dim=1).clamp(min=1e-12) / 127  # (rows,)
            weight[rows] = part.div_(part_scale[:, None]).round_().clamp_(-128, 127).to(torch.int8)
            scale[rows] = part_scale.to(scale.dtype)
        self.weight, self.weight_scale = weight, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = aligned(x.reshape(-1, self.in_features).contiguous())
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """``x @ W.T`` with W as 4-bit groups: ``w = (q - 8) * scale + zero`` per group of ``group_size`` inputs.

    In memory the weight is in the device kernel's packed layout; ``state_dict`` holds the portable form
    (``weight``: uint8 (N, K/2), even column in the low nibble; ``weight_scale_zero``: (G, N, 2)).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = int4_group_size(in_features)
        groups = in_features // self.group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale_zero", torch.empty(groups, out_features, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        n, k = w.shape
        # The CPU packing is separable by blocks of 64 rows, so large weights are quantized and packed in row chunks.
        chunks = [slice(0, n)] if w.is_cuda or n % 64 else row_chunks(n, k, multiple=64)
        packed, scale_zero = [], []
        for rows in chunks:
            groups = w[rows].float().view(-1, k // self.group_size, self.group_size)
            low, high = groups.amin(-1), groups.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-12)  # (rows, G)
            q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).view(-1, k).to(torch.int32)
            packed.append(pack_int4(q))
            scale_zero.append(torch.stack([scale, low + 8 * scale], -1).to(self.weight_scale_zero.dtype))
        self.weight = torch.cat(packed)
        self.weight_scale_zero = torch.cat(scale_zero).transpose(0, 1).contiguous()

    def set_portable(self, plain: torch.Tensor, scale_zero: torch.Tensor) -> None:
        self.weight = pack_int4(unpack_plain(plain).to(torch.int32))
        self.weight_scale_zero = scale_zero.to(self.weight_scale_zero.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        scale_zero = self.weight_scale_zero.to(x.dtype)
        if x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, scale_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, scale_zero)
        y = y.view(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = unpack_int4(self.weight, self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "weight"
        if key in state_dict:  # the portable form, packed for this device's kernel before the copy
            plain = state_dict[key].to(self.weight.device)
            state_dict = {**state_dict, key: pack_int4(unpack_plain(plain).to(torch.int32))}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}"


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it in a fresh allocation: torch's int8 weight-only CPU kernel crashes (segfault) on bfloat16
    inputs whose weight data do not start on a 16-byte boundary or whose activation data do not start on a 32-byte
    one (torch 2.14, AVX-512), as a tensor read from a safetensors file or a slice of a larger one may not."""
    return t if t.data_ptr() % KERNEL_ALIGNMENT == 0 else t.clone()


def row_chunks(n: int, k: int, multiple: int = 1, elements: int = 2**24) -> list[slice]:
    """Row slices of about ``elements`` weights each (a multiple of ``multiple`` rows) covering n rows."""
    rows = max(multiple, elements // k // multiple * multiple)
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def int4_group_size(in_features: int) -> int:
    for size in INT4_GROUP_SIZES:
        if in_features % size == 0:
            return size
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


def unpack_plain(plain: torch.Tensor) -> torch.Tensor:
    """Portable (N, K/2) uint8 -> (N, K) values 0..15."""
    return torch.stack([plain & 15, plain >> 4], -1).view(plain.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int32 in 0..15 -> the device kernel's packed uint8 layout."""
    if q.is_cuda:
        plain = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # tinygemm wants the even column high
        return torch.ops.aten._convert_weight_to_int4pack(plain, 8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The kernel layout back to the portable (N, K/2) uint8 form, whatever layout this machine's kernel uses."""
    nibbles = torch.stack([packed.flatten() & 15, packed.flatten() >> 4], -1).flatten().cpu()  # by packed slot
    q = torch.empty(n * k, dtype=torch.uint8)
    q[int4_layout(n, k, packed.device.type)] = nibbles
    q = q.view(n, k)
    return (q[:, 0::2] | q[:, 1::2] << 4).contiguous()


@lru_cache(maxsize=4)
def int4_layout(n: int, k: int, device: str) -> torch.Tensor:
    """For each nibble slot of the packed weight, the flat (N*K) index it holds: found by packing the index digits."""
    index = torch.arange(n * k, dtype=torch.int64)
    layout = torch.zeros(n * k, dtype=torch.int64)
    for digit in range(math.ceil(math.log(n * k, 16))):
        plane = ((index >> (4 * digit)) & 15).view(n, k).to(torch.int32).to(device)
        packed = pack_int4(plane).flatten().cpu()
        layout |= torch.stack([packed & 15, packed >> 4], -1).flatten().long() << (4 * digit)
    return layout


def nf4_linear(linear_shape: tuple[int, int], bias: bool, dtype: torch.dtype):
    """bitsandbytes' Linear4bit (NF4, blocks of 64, double-quantized scales: QLoRA's format), still on meta."""
    bnb = import_bitsandbytes()
    n, k = linear_shape
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=dtype, quant_type="nf4", device="meta")
    fit_bitsandbytes_cpu_kernel(layer)
    return layer


def fit_bitsandbytes_cpu_kernel(model: nn.Module) -> None:
    """bitsandbytes' AVX512-BF16 CPU kernel repacks a 4-bit weight on the first no-grad call and takes only
    N % 32 == 0 (else an assertion fails); Linear4bit layers of other shapes use its dequantize-and-matmul path."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu &= module.out_features % 32 == 0


def quantize_nf4(w: torch.Tensor, dtype: torch.dtype):
    """bitsandbytes' ``quantize_4bit(w.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4")``, the same
    bytes and state, computed in row chunks on CPU.

    Its CPU quantizer makes float32 temporaries of the whole tensor (8x the NF4 bytes); NF4 blocks of 64 never cross
    a row when in_features % 64 == 0 (the only layers quantized), so chunks quantize independently. The block scales
    are then double-quantized once over the whole weight, as ``quantize_4bit`` does: offset = their mean, then
    8-bit blockwise in blocks of 256.
    """
    functional = import_bitsandbytes().functional
    n, k = w.shape
    chunks = [slice(0, n)] if w.is_cuda or k % NF4_BLOCK else row_chunks(n, k)
    packed, absmax = [], []
    for rows in chunks:
        part, state = functional.quantize_4bit(w[rows].to(dtype).contiguous(), blocksize=NF4_BLOCK, quant_type="nf4")
        packed.append(part)
        absmax.append(state.absmax)
    # One chunk is kept as it is: a copy (torch.cat) of each layer's bytes fragments the heap, the resident peak doubles.
    packed, absmax = (parts[0] if len(parts) == 1 else torch.cat(parts) for parts in (packed, absmax))
    offset = absmax.mean()
    scales, state2 = functional.quantize_blockwise(absmax - offset, blocksize=256)
    state = functional.QuantState(
        absmax=scales, shape=w.shape, dtype=dtype, blocksize=NF4_BLOCK, quant_type="nf4", offset=offset,
        code=functional.get_4bit_type("nf4", device=w.device), state2=state2,
    )
    return packed, state


def import_bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError(f"--quantize nf4 needs bitsandbytes>={MIN_BITSANDBYTES}: pip install -U bitsandbytes") from error
    version = tuple(int(part) for part in re.findall(r"\d+", bnb.__version__)[:2])
    if version < tuple(int(part) for part in MIN_BITSANDBYTES.split(".")):
        raise ImportError(
            f"--quantize nf4 needs bitsandbytes>={MIN_BITSANDBYTES} (its CPU kernels and 4-bit serialization), "
            f"found {bnb.__version__}: pip install -U bitsandbytes"
        )
    return bnb


def default_kept_modules(quantization_config) -> None:
    """Fill the modules a transformers quantization config keeps unconverted, where the user left them unset:
    ``modules_to_not_convert``, which bitsandbytes' config calls ``llm_int8_skip_modules``."""
    for name in ("modules_to_not_convert", "llm_int8_skip_modules"):
        if getattr(quantization_config, name, False) is None:
            setattr(quantization_config, name, list(KEEP_UNQUANTIZED))


def is_quantized_target(name: str, quantize_vision: bool, quantize_lm_head: bool = False) -> bool:
    return bool(
        LANGUAGE_LINEAR.search(name)
        or (quantize_vision and VISION_LINEAR.search(name))
        or (quantize_lm_head and name == "language.lm_head")
    )


def check_mode(mode: str, device: torch.device) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; use one of {', '.join(MODES)}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize={mode!r} has kernels for CPU and CUDA only, not {device.type}; load on cpu or cuda")
    if mode == "nf4":
        import_bitsandbytes()


def replace_linears(
    model: nn.Module,
    mode: str,
    dtype: torch.dtype,
    quantize_vision: bool,
    device: torch.device | None = None,
    quantize_lm_head: bool = False,
) -> list[str]:
    """Swap the targeted nn.Linear modules (still on meta) for quantized shells; returns their names."""
    int4_k = 128 if device is not None and device.type == "cuda" else 32  # tinygemm packs K in tiles of 8 x 16
    names = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not is_quantized_target(name, quantize_vision, quantize_lm_head):
            continue
        if mode == "int4" and (module.in_features % int4_k or module.out_features % 16):
            continue  # no int4 kernel for this shape (vision fc2: 4304 inputs): kept in the model dtype
        if mode == "int8" and module.in_features % INT8_K_MULTIPLE:
            continue  # torch's int8 CPU kernel segfaults on such bf16 rows (the golden vision fc2: 239): kept
        if mode == "nf4" and module.in_features % NF4_BLOCK:
            continue  # bitsandbytes 0.50.2's CPU dequantize misplaces blocks that straddle rows: kept, on any device
        n, k, bias = module.out_features, module.in_features, module.bias is not None
        if mode == "nf4":
            new = nf4_linear((n, k), bias, dtype)
        else:
            new = (Int8Linear if mode == "int8" else Int4Linear)(k, n, bias, dtype, device="meta")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        names.append(name)
    return names


def load_device(device_map) -> torch.device:
    """The one device a quantized model loads onto: ``device_map`` "auto" is CUDA when there is one."""
    if device_map is None:
        return torch.device("cpu")
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    if not isinstance(device_map, (str, torch.device)):
        raise ValueError(
            f"quantize= loads the model onto one device; got device_map={device_map!r}: pass 'cpu', 'cuda', 'cuda:N' or 'auto'"
        )
    device = torch.device(device_map)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={str(device_map)!r} but torch sees no CUDA GPU; load with device_map='cpu'")
    return device


def load_quantized(
    cls,
    path: str | os.PathLike,
    quantize: str | None,
    *,
    dtype: torch.dtype | str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | torch.device | None = None,
    quantize_vision: bool = False,
    quantize_lm_head: bool = False,
    attn_implementation: str | None = None,
    subfolder: str = "",
    **hub,
):
    """Build on the meta device, then read one tensor at a time and quantize each targeted Linear as it arrives.

    Peak memory is the quantized model plus one tensor (and its fp32 copy while it is quantized): the model is
    never materialised in full precision. A folder saved from a quantized model (``config.quantization``)
    loads its integers as they are, without quantizing again. ``hub``: ``revision``, ``token``, ``cache_dir``,
    ``local_files_only``, ``force_download``, as for ``from_pretrained`` of a Hub repo id.
    """
    from safetensors import safe_open

    unknown = sorted(set(hub) - set(HUB_KEYWORDS) - IGNORED_KEYWORDS)
    if unknown:
        raise TypeError(
            f"from_pretrained(quantize=...) does not take {', '.join(unknown)}; it takes dtype, device_map, "
            f"quantize_vision, quantize_lm_head, attn_implementation and the Hub keywords {', '.join(HUB_KEYWORDS)}"
        )
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        download = {key: hub[key] for key in HUB_KEYWORDS if key in hub and key != "subfolder"}
        patterns = [f"{subfolder}/*.json", f"{subfolder}/*.safetensors"] if subfolder else ["*.json", "*.safetensors"]
        folder = Path(snapshot_download(str(path), allow_patterns=patterns, **download))
    folder = folder / subfolder
    config = cls.config_class.from_pretrained(folder)
    saved = getattr(config, "quantization", None)
    if saved is not None:
        if quantize not in (None, saved["mode"]):
            raise ValueError(
                f"{folder} holds {saved['mode']} weights, quantized when it was saved: leave out quantize= (--quantize) "
                f"or set it to '{saved['mode']}'"
            )
        quantize, quantize_vision, quantize_lm_head = saved["mode"], saved.get("vision", False), saved.get("lm_head", False)
    device = load_device(device_map)
    check_mode(quantize, device)
    dtype = dtype if dtype is not None else torch_dtype  # transformers' older name, which it still takes
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype) if dtype != "auto" else None
    if dtype is None:  # "auto": a saved quantized model computes in the dtype it was saved with, else bf16
        dtype = config.dtype if saved is not None and isinstance(config.dtype, torch.dtype) else torch.bfloat16
    with torch.device("meta"):
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    names = replace_linears(model, quantize, dtype, quantize_vision, device, quantize_lm_head)
    expected = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
    if saved is None:  # a full-precision checkpoint: one weight per quantized Linear, scales are computed here
        expected = {key for key in expected if not key.endswith((".weight_scale", ".weight_scale_zero"))}
    saved_nf4 = set(names) if saved is not None and quantize == "nf4" else set()
    pending: dict[str, dict[str, torch.Tensor]] = {}  # saved int4 / nf4 layers whose parts have not all arrived
    seen, unexpected = set(), []
    try:
        files = checkpoint_files(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}: quantized loading reads safetensors only") from None
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as shard:
            for key in shard.keys():
                module_name, _, state_part = key.partition(".weight.")  # NF4 state: "<linear>.weight.absmax", ...
                if module_name in saved_nf4:
                    pending.setdefault(module_name, {})[state_part] = shard.get_tensor(key)
                    continue
                if key not in expected:
                    unexpected.append(key)
                    continue
                seen.add(key)
                place_tensor(model, key, shard.get_tensor(key), dtype, saved is not None, pending)
    if saved_nf4:
        place_nf4_saved(model, pending, device)
    missing = sorted(expected - seen)
    unkernelled = sorted(key for key in unexpected if key.endswith(".weight_scale_zero"))
    if saved is not None and device.type == "cuda" and unkernelled:
        raise ValueError(
            f"{path} holds int4 layers saved on CPU that CUDA's int4 kernel cannot run (inputs not a multiple of 128: "
            f"{', '.join(k.rpartition('.')[0] for k in unkernelled[:3])}): load it on CPU, or quantize the bf16 "
            "checkpoint on the GPU (quantize='int4' with device_map='cuda')"
        )
    if missing or unexpected:
        raise ValueError(
            f"The checkpoint at {path} does not match the DeepSeek-VL2 architecture of its config.json: missing "
            f"{missing[:10]}, unexpected {sorted(unexpected)[:10]}. Check that all shards are there."
        )
    model.config.quantization = {"mode": quantize, "vision": quantize_vision, "lm_head": quantize_lm_head, "modules": len(names)}
    model.quantized_modules = names
    return model.eval()


def place_tensor(model: nn.Module, key: str, tensor: torch.Tensor, dtype, prequantized: bool, pending: dict) -> None:
    """Put one checkpoint tensor into the meta-built model: quantize it if it is a targeted Linear's weight."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    if isinstance(owner, (Int8Linear, Int4Linear)) and attr.startswith("weight"):
        if not prequantized:
            owner.set_weight(tensor)
        elif isinstance(owner, Int8Linear):
            setattr(owner, attr, aligned(tensor) if attr == "weight" else tensor.to(dtype))
        else:  # int4: pack once both halves have arrived (they may sit in different shards)
            parts = pending.setdefault(owner_name, {})
            parts[attr] = tensor
            if len(parts) == 2:
                owner.set_portable(parts.pop("weight"), parts.pop("weight_scale_zero"))
        return
    if type(owner).__name__ == "Linear4bit" and attr == "weight":
        if prequantized:  # packed NF4 bytes: they wait for their quantization state (see place_nf4_saved)
            pending.setdefault(owner_name, {})["weight"] = tensor
        else:
            packed, state = quantize_nf4(tensor, dtype)
            # bitsandbytes' CPU quantizer allocates and frees float32 temporaries on every call; glibc kept the freed
            # pages in holes between the packed weights, and the resident peak of an nf4 load (fresh processes, one
            # 3-layer Tiny checkpoint) ranged 1.0x-4.7x the model. A trim after each weight keeps it at 0.98-1.00x
            # (8 of 8 loads) for about 20% more load time; trimming every 64-256 MB read did not (up to 1.9x).
            if tensor.device.type == "cpu" and (trim := malloc_trim()) is not None:
                trim(0)
            owner.weight = import_bitsandbytes().nn.Params4bit(
                packed, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK, compress_statistics=True,
                quant_type="nf4", module=owner, bnb_quantized=True,
            )
            owner.quant_state = state
            keep_nf4_state(owner)
        return
    value = tensor.to(dtype) if tensor.is_floating_point() else tensor
    if isinstance(getattr(owner, attr), nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(owner, attr, value)


def place_nf4_saved(model: nn.Module, pending: dict[str, dict[str, torch.Tensor]], device: torch.device) -> None:
    """Give each saved NF4 Linear its packed weight and quantization state (absmax, code, double-quant scales)."""
    bnb = import_bitsandbytes()
    for name, parts in pending.items():
        owner, weight = model.get_submodule(name), parts.pop("weight", None)
        if weight is None or not any(key.startswith("quant_state.") for key in parts):
            raise ValueError(f"the saved NF4 layer {name} lacks its weight or quantization state: save it again")
        owner.weight = bnb.nn.Params4bit.from_prequantized(weight, parts, device=device, module=owner)
        keep_nf4_state(owner)


def keep_nf4_state(layer: nn.Module) -> None:
    """Keep the NF4 block scales as loaded, for ``state_dict``.

    On AVX512-BF16 CPUs, bitsandbytes' first no-grad call repacks the weight for its kernel and turns the
    double-quantized scales into bfloat16; its ``state_dict`` then undoes the repacking but quantizes the scales
    anew, so a saved model would compute slightly different outputs. The kept state (1/64 byte per weight) is
    what ``state_dict`` writes instead: the saved model reloads to the same outputs.
    """
    layer.loaded_quant_state = copy.deepcopy(layer.weight.quant_state)
    layer.register_state_dict_pre_hook(restore_nf4_state)


def restore_nf4_state(layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):  # the weight's bytes back in NF4 order
        layer.weight.data = _convert_weight_packed_for_cpu_inverse(layer.weight.data, copy.deepcopy(layer.weight.quant_state))[0]
        layer.weight.quant_state = layer.quant_state = copy.deepcopy(layer.loaded_quant_state)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, as stored in memory."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())
