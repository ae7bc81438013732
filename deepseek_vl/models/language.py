"""DeepSeekMoE language model of DeepSeek-VL2 (the DeepSeek-V2 architecture, arXiv:2405.04434).

Tiny uses plain multi-head attention (``use_mla: false``, Llama layout); Small and Base use
Multi-head Latent Attention. Every layer after ``first_k_dense_replace`` is a mixture of shared
and routed experts. Module and parameter names are the checkpoint keys under ``language.``.

Letters in shape comments: B batch, T new tokens, S cached + new tokens, H heads, D hidden,
R kv_lora_rank, E routed experts, K experts per token, N = B*T tokens.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel, RepetitionPenaltyLogitsProcessor
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache import InPlaceCache
from .configuration import DeepseekV2Config

logger = logging.get_logger(__name__)


class DeepseekV2RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the scale, as upstream."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with fp32 one-row products and decode batches on CPU split over the threads, same math.

    For one row torch runs MKL's matrix-vector kernel on one thread, and for a few rows a matrix-matrix kernel
    that blocks poorly; both read the weight at a third to half the rate the machine allows
    (``benchmarks/micro_decode.py``). The same product as one batched matmul over ``threads`` blocks of the weight's
    rows runs one block per thread, at 1.3-1.9x the read rate. For one row the result is bit-identical (each output
    is the same dot product). For several rows MKL may block the sums differently per block size, so the split is
    used only for decode steps of up to ``SPLIT_MAX_ROWS`` rows, (B, 1, D), whose outputs may differ by fp32
    rounding (summation order) from ``F.linear``; prompts, and their expert slices, keep ``F.linear``, so a
    prompt's logits do not depend on how many of its positions are projected. bf16 products go to oneDNN, or to
    torch's own matrix-vector kernel inside ``decode_kernels``.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    decode_batch = x.dim() == 3 and x.shape[1] == 1 and rows <= SPLIT_MAX_ROWS  # (B, 1, D): one new token per row
    plain = bias is None and x.device.type == "cpu" and type(weight) in PLAIN_TENSORS
    if not plain or (rows != 1 and not decode_batch):
        return F.linear(x, weight, bias)
    threads = torch.get_num_threads()
    if weight.dtype != torch.float32 or threads == 1 or weight.shape[0] % threads or not weight.is_contiguous():
        return F.linear(x, weight)
    out, features = weight.shape
    blocks = weight.view(threads, out // threads, features)  # (threads, o, features): one block per thread
    blocks = torch.matmul(x.reshape(rows, features), blocks.mT)  # (threads, rows, o)
    return blocks.transpose(0, 1).reshape(*x.shape[:-1], out)


SPLIT_MAX_ROWS = 16  # larger decode batches read each weight once for enough rows to use MKL's kernel well
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)  # weights of other types (quantized tensor subclasses) keep F.linear
LOW_PRECISION = (torch.bfloat16, torch.float16)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear`` (same parameters and checkpoint keys); in training, a wide product (the
    LM head) is taken in blocks of outputs, see ``blocked_linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.bias is None and self.out_features > GRAD_BLOCK_OUTPUTS and type(self.weight) in PLAIN_TENSORS
        if wide and self.training and torch.is_grad_enabled():
            return blocked_linear(x, self.weight)
        return linear(x, self.weight, self.bias)


GRAD_BLOCK_OUTPUTS = 8192


def blocked_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear`` in blocks of ``GRAD_BLOCK_OUTPUTS`` outputs (the same dot products), for a precise input gradient.

    The LM head's input gradient sums over the 129,280 vocabulary entries. The training loss projects only the
    labelled positions, and for a few rows MKL's fp32 kernel accumulates that sum with about 10x the rounding error
    of its many-row kernel, which the official code gets by projecting every position: with a few labelled tokens
    (1-3 on one thread, 5-11 too on two) every gradient then differed from the official by up to 7x the tolerance.
    Per block the sums are short and autograd adds the blocks' gradients: as precise as the official for any count.
    """
    return torch.cat([F.linear(x, block) for block in weight.split(GRAD_BLOCK_OUTPUTS)], dim=-1)


class OneDNNSwitch:
    """Holds oneDNN off, process-wide, while any thread is inside ``off()``; the last one out restores the setting.

    torch reaches its own bf16 matrix-vector kernel only through the process-wide ``torch.backends.mkldnn`` switch.
    The count makes concurrent holders safe among themselves: the switch is read once when the first one enters and
    restored when the last one leaves, never left off. Other threads' bf16 products and convolutions that run
    meanwhile use torch's kernels too: the same results to bf16 rounding, slower for large products.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.saved = True

    @contextlib.contextmanager
    def off(self):
        with self.lock:
            if self.holders == 0:
                self.saved = torch.backends.mkldnn.enabled
                torch.backends.mkldnn.enabled = False
            self.holders += 1
        try:
            yield
        finally:
            with self.lock:
                self.holders -= 1
                if self.holders == 0:
                    torch.backends.mkldnn.enabled = self.saved


ONEDNN = OneDNNSwitch()


def decode_kernels(tokens: torch.Tensor, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Where to run a forward over ``tokens`` (B, T) or (B, T, D) at ``dtype``: one-row bf16 decode steps on CPU
    on torch's own kernels.

    oneDNN's one-row bf16 product reads the weight at 16-20 GB/s, torch's matrix-vector kernel at the machine's read
    rate (30-38 GB/s; ``benchmarks/micro_decode.py``): a batch-1 bf16 decode step of Tiny takes 25 ms instead of 43.
    Both accumulate in fp32 and round each output to bf16 once. Prompts and decode batches of several rows keep
    oneDNN, faster there (and prompt logits stay those of the official code's kernels).
    """
    one_row = tokens.shape[0] == 1 and tokens.shape[1] == 1
    if one_row and dtype == torch.bfloat16 and tokens.device.type == "cpu" and torch.backends.mkldnn.is_available():
        return ONEDNN.off()
    return contextlib.nullcontext()


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, base: float, factor: float, scaling: dict) -> torch.Tensor:
    """YaRN: interpolate low frequencies by ``factor``, keep high ones, ramp in between."""
    original = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / base**exponents
    interpolated = 1.0 / (factor * base**exponents)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    keep = 1.0 - ramp
    return interpolated * (1 - keep) + extrapolated * keep


class DeepseekV2RotaryEmbedding(nn.Module):
    """cos/sin of the rotary embedding per position, with the official scalings (linear, dynamic NTK, YaRN).

    Frequencies are computed per call (dim/2 numbers): a buffer would be left unset when transformers
    builds the model on the meta device, as ``from_pretrained`` does.

    ``model.to(torch.bfloat16)`` (the model card's way to run in bf16) also casts the official code's fp32
    ``inv_freq`` buffer, and its unscaled rotary then computes with the rounded frequencies: the MHA one (Tiny,
    transformers' Llama rotary) in fp32, the MLA one (Small, Base) with the whole table in that dtype, positions
    included (in bf16, 1446 becomes 1448). ``_apply`` records those casts, so the same call gives the official
    numbers here; loading straight into a dtype (``dtype=``), where the official buffer stays fp32, computes exactly.
    """

    def __init__(self, config: DeepseekV2Config, dim: int) -> None:
        super().__init__()
        self.dim, self.base = dim, config.rope_theta
        self.table_in_buffer_dtype = bool(config.use_mla)  # the official MLA rotary; MHA uses transformers' Llama one
        self.buffer_casts: tuple[torch.dtype, ...] = ()  # dtypes `.to()` / `.half()` gave the official buffer
        self.max_position_embeddings = config.max_position_embeddings
        self.scaling = config.rope_scaling or {}
        self.kind = self.scaling.get("type", self.scaling.get("rope_type", "default"))
        self.factor = self.scaling.get("factor", 1.0)
        self.mscale = 1.0
        if self.kind == "yarn":
            self.mscale = yarn_get_mscale(self.factor, self.scaling.get("mscale", 1)) / yarn_get_mscale(
                self.factor, self.scaling.get("mscale_all_dim", 0)
            )

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        if self.kind == "yarn":
            return yarn_inv_freq(self.dim, self.base, self.factor, self.scaling)
        base = self.base
        if self.kind == "dynamic" and seq_len > self.max_position_embeddings:
            ntk = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            base = base * ntk ** (self.dim / (self.dim - 2))
        return 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim)

    def _apply(self, fn, recurse: bool = True):
        """Follow the official fp32 ``inv_freq`` buffer through ``.to(dtype)``, ``.half()``, ``.float()``..."""
        buffer_dtype = self.buffer_casts[-1] if self.buffer_casts else torch.float32
        cast = fn(torch.zeros((), dtype=buffer_dtype)).dtype
        if cast != buffer_dtype:
            self.buffer_casts = (*self.buffer_casts, cast)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = position_ids.float()
        if self.kind == "linear":
            positions = positions / self.factor
        seq_len = int(position_ids.max()) + 1 if self.kind == "dynamic" else 0
        inv_freq = self.inv_freq(seq_len).to(positions.device)
        if self.buffer_casts and self.kind == "default":  # the official numbers after a cast: see the class docstring
            for cast in self.buffer_casts:
                inv_freq = inv_freq.to(cast)
            if self.table_in_buffer_dtype:
                positions = positions.to(inv_freq.dtype)
            else:
                inv_freq = inv_freq.float()
        freqs = positions[..., None] * inv_freq  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.mscale).to(dtype), (emb.sin() * self.mscale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate (B, H, T, d) by (B, T, d) tables; MLA checkpoints store the rope dims interleaved."""
    if interleaved:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(4, 3).reshape(b, h, t, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def causal_padding_mask(
    attention_mask: torch.Tensor | None, past_length: int, query_length: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B, 1, T, S) mask, True where a query may attend; None for a plain causal batch.

    None means no padding and either a single query or no cache: SDPA's ``is_causal`` covers it.
    Each query may always see itself, so left-padding rows never become all-masked (NaN).
    """
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None and (query_length == 1 or past_length == 0):
        return None
    total = past_length + query_length
    key_pos = torch.arange(total, device=device)
    query_pos = torch.arange(past_length, total, device=device)[:, None]
    mask = key_pos <= query_pos  # (T, S)
    if attention_mask is None:
        return mask[None, None]
    keys_valid = attention_mask[:, None, None, -total:].bool()  # (B, 1, 1, S)
    return (mask & keys_valid) | (key_pos == query_pos)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities from (..., T, S) scores: softmax in fp32, cast back, as the official eager path."""
    if mask is None and scores.shape[-2] > 1:  # plain causal batch, no cache (see causal_padding_mask)
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def attention_dropout(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on the attention probabilities, as the official layers apply ``attention_dropout`` in training."""
    return F.dropout(probs, p) if p > 0 else probs


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    """softmax(q k^T * scale) v spelled out: the official math, kept as the reference path."""
    probs = masked_softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, mask)
    return torch.matmul(attention_dropout(probs, dropout), v)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, dropout: float = 0.0
) -> torch.Tensor:
    one_query = q.shape[-2] == 1 and q.device.type == "cpu" and q.dtype in LOW_PRECISION
    if one_query and not dropout and not torch.backends.mkldnn.enabled:
        return decode_attention(q, k, v, mask, scale)
    causal = mask is None and q.shape[-2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scale)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query per row in bf16/fp16 on CPU with oneDNN off (``decode_kernels``): the official eager math.

    torch's fused low-precision CPU kernel repacks every key/value block on each call, which one query cannot
    amortise: 1.6 ms for 1,447 cached tokens of Tiny, against 0.5 ms for these two products on torch's own kernels
    (the values as v^T p, the layout its batched kernel runs 8x faster). With oneDNN on, the fused kernel is faster.
    """
    probs = masked_softmax(torch.matmul(q, k.mT) * scale, mask)  # (B, H, 1, S), contiguous
    return torch.matmul(v.mT, probs.view(*probs.shape[:2], -1, 1)).mT  # (B, H, hd, 1) -> (B, H, 1, hd)


class DeepseekV2MHA(nn.Module):
    """Multi-head attention of Tiny (``use_mla: false``): the Llama layout with standard RoPE."""

    def __init__(self, config: DeepseekV2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, *rope, interleaved=False), apply_rotary(k, *rope, interleaved=False)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, S, hd)
        if self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        attend = eager_attention if self.config._attn_implementation == "eager" else sdpa_attention
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attend(q, k, v, mask, self.scale, dropout)  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def per_head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, H, T, i) @ (H, i, o) -> (B, H, T, o) as one batched matmul over heads, without copying the weight per row."""
    b, h, t, _ = x.shape
    out = torch.bmm(x.transpose(0, 1).reshape(h, b * t, -1), weight)  # (H, B*T, o)
    return out.view(h, b, t, -1).transpose(0, 1)


class DeepseekV2MLA(nn.Module):
    """Multi-head Latent Attention: keys and values are decompressed from a cached latent of R numbers.

    The cache holds only the normalised latent (B, 1, S, R) and the shared rope key (B, 1, S, rope).
    A few queries (decoding) attend in the latent space with ``kv_b_proj`` absorbed into the query
    and output; many queries (prefill) decompress keys and values once and use fused attention.
    ``attn_implementation="eager"`` always takes the absorbed form, the official eager math. A ``kv_b_proj`` with an
    unmerged peft adapter is always decompressed through its forward (merge the adapter for the fast decode).
    """

    absorbed_max_queries = 16

    def __init__(self, config: DeepseekV2Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank, self.kv_lora_rank = config.q_lora_rank, config.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        q_head_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, self.num_heads * q_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(config.hidden_size, self.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = DeepseekV2RMSNorm(self.q_lora_rank)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(
            config.hidden_size, self.kv_lora_rank + self.rope_dim, bias=config.attention_bias
        )
        self.kv_a_layernorm = DeepseekV2RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = Linear(self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.num_heads * self.v_dim, config.hidden_size, bias=config.attention_bias)
        self.register_buffer("dense_kv_b", None, persistent=False)  # see kv_b_weight
        self.scale = q_head_dim**-0.5
        if config.rope_scaling is not None and config.rope_scaling.get("mscale_all_dim", 0):
            mscale = yarn_get_mscale(config.rope_scaling["factor"], config.rope_scaling["mscale_all_dim"])
            self.scale *= mscale * mscale

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)  # (B, 1, T, R)
        k_pe = k_pe.view(b, t, 1, self.rope_dim).transpose(1, 2)  # (B, 1, T, rope)
        q_pe, k_pe = apply_rotary(q_pe, *rope, interleaved=True), apply_rotary(k_pe, *rope, interleaved=True)
        if cache is not None:
            k_pe, latent = cache.update(k_pe, latent, self.layer_idx)  # (B, 1, S, rope), (B, 1, S, R)
        adapter = hasattr(self.kv_b_proj, "base_layer")  # peft: only its forward adds the adapter's update
        if not adapter and (self.config._attn_implementation == "eager" or t <= self.absorbed_max_queries):
            out = self.absorbed_attention(q_nope, q_pe, latent, k_pe, mask)
        else:
            out = self.decompressed_attention(q_nope, q_pe, latent, k_pe, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # out: (B, H, T, v)

    def absorbed_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention in the latent space: O(S*R) per query instead of decompressing S keys per head.

        All heads share the latent and the rope key, so heads fold into rows: one (H*T, R) @ (R, S) product per row
        of the batch instead of the cache broadcast to every head (2x faster in fp32). bf16/fp16 on CPU attend in
        fp32: torch's low-precision batched products are 15x slower than fp32 at these shapes.
        """
        w = self.kv_b_weight(q_nope).view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_k, w_v = w[:, : self.nope_dim], w[:, self.nope_dim :]  # (H, nope, R), (H, v, R)
        q_latent = per_head_matmul(q_nope, w_k)  # (B, H, T, R)
        b, h, t, _ = q_latent.shape
        dtype = q_latent.dtype
        if q_latent.device.type == "cpu" and dtype in LOW_PRECISION:
            latent, k_pe = latent.float(), k_pe.float()

        def fold(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, d) -> (B, 1, H*T, d)
            return x.reshape(b, 1, h * t, -1).to(latent.dtype)

        scores = torch.matmul(fold(q_pe), k_pe.mT) + torch.matmul(fold(q_latent), latent.mT)  # (B, 1, H*T, S)
        probs = masked_softmax(scores.view(b, h, t, -1) * self.scale, mask)  # (B, H, T, S)
        probs = attention_dropout(probs, self.config.attention_dropout if self.training else 0.0)
        out = torch.matmul(probs.view(b, 1, h * t, -1), latent).view(b, h, t, -1).to(dtype)  # (B, H, T, R)
        return per_head_matmul(out, w_v.mT)  # (B, H, T, v)

    def kv_b_weight(self, like: torch.Tensor) -> torch.Tensor:
        """``kv_b_proj``'s (H*(nope+v), R) weight, which the absorbed attention reads per head.

        A pre-quantized checkpoint's ``kv_b_proj`` (GPTQ / AutoRound packed integers) has no such weight: projecting
        the identity through it, in the dtype of ``like``, gives exactly the weight its own forward uses. Without
        gradients it is kept, as a non-persistent buffer that follows ``.to()``: 0.4% of Small's parameters, which
        this package's own quantization keeps unquantized for the same reason.
        """
        weight = getattr(self.kv_b_proj, "weight", None)
        if type(weight) in PLAIN_TENSORS and weight.is_floating_point():
            return weight
        kept = self.dense_kv_b
        if kept is not None and kept.dtype == like.dtype and not torch.is_grad_enabled():
            return kept
        eye = torch.eye(self.kv_lora_rank, dtype=like.dtype, device=like.device)
        dense = self.kv_b_proj(eye).T  # (H*(nope+v), R): row j of the identity picks input j
        if not torch.is_grad_enabled():
            self.dense_kv_b = dense.contiguous()
        return dense

    def decompressed_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Standard attention over keys/values rebuilt from the latent: fewer FLOPs for many queries."""
        b, _, s, _ = latent.shape
        kv = self.kv_b_proj(latent.squeeze(1)).view(b, s, self.num_heads, -1).transpose(1, 2)  # (B, H, S, nope+v)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        return sdpa_attention(q, k, v, mask, self.scale, self.config.attention_dropout if self.training else 0.0)


class DeepseekV2MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers, each routed expert and the fused shared experts."""

    def __init__(self, config: DeepseekV2Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        width = intermediate_size or config.intermediate_size
        self.gate_proj = Linear(config.hidden_size, width, bias=False)
        self.up_proj = Linear(config.hidden_size, width, bias=False)
        self.down_proj = Linear(width, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Router: scores in fp32, then one of the official top-k methods; returns (topk_idx, topk_weight)."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor, return_scores: bool = False) -> tuple[torch.Tensor, ...]:
        """(idx, weight), plus the scores for the balance loss in training (through forward, so that a
        wrapped trainable copy of the router, as peft's modules_to_save makes, is the one that runs)."""
        scores = self.scores(x)
        return (*self.select(scores), scores) if return_scores else self.select(scores)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) routing scores of the tokens of x (..., D), in fp32."""
        logits = linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())  # (N, E), router in fp32
        return logits.softmax(dim=-1) if self.config.scoring_func == "softmax" else logits.sigmoid()

    def select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, K) chosen experts and their weights from the (N, E) scores."""
        cfg = self.config
        if cfg.topk_method == "greedy":
            weight, idx = scores.topk(self.top_k, dim=-1, sorted=False)
        elif cfg.topk_method == "group_limited_greedy":
            group_scores = scores.view(scores.shape[0], cfg.n_group, -1).amax(dim=-1)  # (N, groups)
            weight, idx = self.masked_to_groups(scores, group_scores).topk(self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: the bias only chooses the experts; weights are the unbiased scores
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(scores.shape[0], cfg.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
            idx = self.masked_to_groups(choice, group_scores).topk(self.top_k, dim=-1, sorted=False).indices
            weight = scores.gather(1, idx)
        if self.top_k > 1 and cfg.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weight * cfg.routed_scaling_factor

    def load_balancing_loss(self, scores: torch.Tensor, idx: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Auxiliary expert-balance loss of DeepSeekMoE training (arXiv:2401.06066, sec. 3.3), times aux_loss_alpha.

        Sum over experts of (load fraction x E) times (mean score), per sequence (``seq_aux``) then averaged over
        rows, or over the whole batch. Only real tokens count (token_mask (B, T)): the official code also counts
        the pads of a padded row, whose router inputs are padding garbage; without padding the two agree.
        """
        cfg = self.config
        rows, num_experts = token_mask.shape[0], scores.shape[-1]
        valid = token_mask.to(scores.dtype)  # (B, T)
        picks = torch.zeros(rows, num_experts, device=scores.device, dtype=scores.dtype)
        picks.scatter_add_(1, idx.view(rows, -1), valid.repeat_interleave(self.top_k, dim=1))  # (B, E) choices
        score_sums = (scores.view(rows, -1, num_experts) * valid.unsqueeze(-1)).sum(dim=1)  # (B, E)
        if cfg.seq_aux:
            tokens = valid.sum(dim=1, keepdim=True)  # (B, 1)
            load = picks / (tokens * self.top_k / num_experts)
            return (load * score_sums / tokens).sum(dim=1).mean() * cfg.aux_loss_alpha
        tokens = valid.sum()
        load = picks.sum(dim=0) / (tokens * self.top_k) * num_experts
        return (load * score_sums.sum(dim=0) / tokens).sum() * cfg.aux_loss_alpha

    def masked_to_groups(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """Zero the scores outside the ``topk_group`` best expert groups (0, not -inf, as upstream)."""
        n, groups = group_scores.shape
        best = group_scores.topk(self.config.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.unsqueeze(-1).expand(n, groups, scores.shape[-1] // groups).reshape(n, -1)
        return scores.masked_fill(~keep, 0.0)


class DeepseekV2MoE(nn.Module):
    """Shared experts plus the top-k routed experts, each expert run once on all of its tokens.

    ``reference = True`` switches to the straightforward path (every expert over a boolean mask of
    the token copies), kept to check and benchmark the grouped one against.
    """

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.reference = False
        # this micro-batch's share of the balance loss of the whole step: the fine-tuning Trainer sets it under gradient
        # accumulation and data parallelism, whose micro-batch losses each add their gradient
        self.aux_loss_weight = 1.0
        self.experts = nn.ModuleList(
            DeepseekV2MLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.gate = MoEGate(config)
        if config.n_shared_experts is not None:
            self.shared_experts = DeepseekV2MLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return self.train_forward(x, token_mask)
        idx, weight = self.gate(x)
        flat = x.reshape(-1, x.shape[-1])
        if self.reference:
            y = self.routed_reference(flat, idx, weight).view_as(x)
        else:
            y = self.routed(flat, idx, weight, decode=x.shape[1] == 1).view_as(x)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y

    def sort_by_expert(self, x: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The N*K (token, choice) copies of x (N, D) grouped by chosen expert: (N*K, D) tokens, the sort order and
        the count per expert (its `.tolist()` is the one host sync per layer)."""
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        return x[order // idx.shape[1]], order, counts

    def routed(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """Sort the N*K (token, expert) pairs by expert and run each chosen expert on one slice.

        In a decode step (one new token per row) each slice goes in as (count, 1, D), a decode batch, whose
        products ``linear`` splits over the threads like the step's other products.
        """
        n, k = idx.shape
        tokens, order, counts = self.sort_by_expert(x, idx)
        expert_out, start = torch.empty_like(tokens), 0
        for expert, count in zip(self.experts, counts):
            if count:
                chunk = tokens[start : start + count]
                out = expert(chunk[:, None])[:, 0] if decode else expert(chunk)
                expert_out.index_copy_(0, order[start : start + count], out)  # back to (token, choice) order
                start += count
        return weighted_sum(expert_out.view(n, k, -1), weight)

    def train_forward(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Training: every expert runs (DDP sees a gradient for each) and the balance loss adds its gradient.

        x: (B, T, D); token_mask (B, T) marks real tokens (None: all). The returned value is unchanged by the
        auxiliary loss, as in the official code: the loss reported stays the language-model loss.
        """
        idx, weight, scores = self.gate(x, return_scores=True)  # scores: (N, E)
        y = self.routed_all_experts(x.reshape(-1, x.shape[-1]), idx, weight).view_as(x)
        if self.gate.config.aux_loss_alpha > 0:
            if token_mask is None:
                token_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            aux_loss = self.gate.load_balancing_loss(scores, idx, token_mask) * self.aux_loss_weight
            y = AddAuxiliaryLoss.apply(y, aux_loss)
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y

    def routed_all_experts(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The grouped path without in-place writes; experts with no tokens run on an empty slice."""
        n, k = idx.shape
        tokens, order, counts = self.sort_by_expert(x, idx)
        chunks = tokens.split(counts)
        expert_out = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks)])
        expert_out = expert_out.index_select(0, order.argsort())  # back to (token, choice) order
        return weighted_sum(expert_out.view(n, k, -1), weight)

    def routed_reference(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Every expert over a boolean mask of the K copies of each token (the official training path)."""
        n, k = idx.shape
        copies = x.repeat_interleave(k, dim=0)  # (N*K, D), copy j*K+i goes to expert idx[j, i]
        flat = idx.flatten()
        expert_out = torch.zeros_like(copies)
        for e, expert in enumerate(self.experts):
            chosen = flat == e
            expert_out[chosen] = expert(copies[chosen])
        return weighted_sum(expert_out.view(n, k, -1), weight)


class AddAuxiliaryLoss(torch.autograd.Function):
    """Identity on y whose backward also sends gradient 1 into an auxiliary loss, so the loss value stays the LM's."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux_loss.shape, aux_loss.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad_y, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_y.device)


def weighted_sum(expert_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, K, D) expert outputs combined with the (N, K) router weights in fp32, cast back (as upstream).

    Where no gradient flows, the products are taken in place (in ``expert_out`` itself when it is fp32): the
    (N*K, D) buffer is the largest of a prefill's MoE layer, and on CPU a fresh one is page-faulted in each time.
    """
    scaled = expert_out.float()
    if scaled.requires_grad or weight.requires_grad:
        scaled = scaled * weight.unsqueeze(-1)
    else:
        scaled.mul_(weight.unsqueeze(-1))
    return scaled.sum(dim=1).to(expert_out.dtype)


class DeepseekV2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeepseekV2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = (DeepseekV2MLA if config.use_mla else DeepseekV2MHA)(config, layer_idx)
        self.mlp = DeepseekV2MoE(config) if config.is_moe_layer(layer_idx) else DeepseekV2MLP(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """token_mask (B, T): the real (unpadded) tokens, for the MoE balance loss in training."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, token_mask) if isinstance(self.mlp, DeepseekV2MoE) else self.mlp(h))


class DeepseekV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekV2Config
    config: DeepseekV2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekV2DecoderLayer"]
    _supports_sdpa = True


class DeepseekV2Model(DeepseekV2PreTrainedModel):
    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rope_dim = config.qk_rope_head_dim if config.use_mla else config.hidden_size // config.num_attention_heads
        self.rotary_emb = DeepseekV2RotaryEmbedding(config, rope_dim)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        elif (dtype := self.embed_tokens.weight.dtype) in LOW_PRECISION and inputs_embeds.dtype != dtype:
            raise ValueError(f"inputs_embeds are {inputs_embeds.dtype} but the model runs in {dtype}: pass "
                             "inputs_embeds.to(model.dtype)")  # fmt: skip
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = InPlaceCache()
        past = cache.get_seq_length() if cache is not None else 0
        batch, length = inputs_embeds.shape[:2]
        if past + length > self.config.max_position_embeddings:  # the official code runs on, and so does this one
            logger.warning_once(
                f"The input is longer than the {self.config.max_position_embeddings} tokens the model was trained on "
                "(max_position_embeddings): expect weaker answers. Shorten the prompt, use fewer or smaller images, "
                "or split the conversation."
            )
        mask_fits = attention_mask is None or (
            attention_mask.shape[0] == batch and attention_mask.shape[1] >= past + length
        )
        if not mask_fits or (position_ids is not None and position_ids.shape[-1] != length):  # generate's come from it
            raise ValueError(
                f"the attention_mask (or position_ids) does not fit {batch} rows of {past} cached and {length} new "
                f"tokens: pass an attention_mask of ({batch}, {past + length}), the processor's"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).expand(batch, -1)
        mask = causal_padding_mask(attention_mask, past, length, inputs_embeds.device)
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)

        token_mask = None
        if self.training and attention_mask is not None:
            token_mask = attention_mask[:, -length:].bool()  # real tokens, for the MoE balance loss
        x = inputs_embeds
        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, rope, mask, cache, token_mask)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states[-1] = x
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            cache=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )


class DeepseekV2ForCausalLM(DeepseekV2PreTrainedModel, GenerationMixin):
    """The language model with its LM head: ``language`` (alias ``language_model``) in the VL model."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__(config)
        self.model = DeepseekV2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``, with a cache the caller passes first cut back to all prompt tokens but the last.

        This package's cache grows in place, so one prefilled by ``incremental_prefilling`` (or used by an earlier
        call) then serves several answers, as the official code's immutable one does.
        """
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prompts = (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), args[0] if args else None)
        prompt = next((tensor for tensor in prompts if tensor is not None), None)
        if isinstance(cache, Cache) and prompt is not None:
            surplus = cache.get_seq_length() - (prompt.shape[1] - 1)
            if surplus > 0:
                cache.crop(-surplus)
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """``generate``'s default cache is the in-place one: a ``DynamicCache`` that does not copy itself each step.

        Only the cache ``generate`` makes itself is replaced: a cache the caller passed (possibly holding a prefix) and
        an explicit ``cache_implementation`` are kept as they are.
        """
        prepared = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        made_here = not getattr(cache, "_is_user_defined", False) and generation_config.cache_implementation is None
        if type(cache) is DynamicCache and made_here:
            model_kwargs["cache"] = InPlaceCache()
        return prepared

    def _get_logits_processor(self, generation_config, input_ids_seq_length: int | None = None, *args, **kwargs):
        """The repetition penalty of ``generate(inputs_embeds=...)`` without ``input_ids`` sees only the answer's
        tokens, so a left-padded row has no prompt padding to skip; transformers skips as many answer tokens as the
        row has pads (and the model card's batched calls would then repeat what the official code penalises).
        """
        processors = super()._get_logits_processor(generation_config, input_ids_seq_length, *args, **kwargs)
        if not input_ids_seq_length:
            for processor in processors:
                if isinstance(processor, RepetitionPenaltyLogitsProcessor):
                    processor.prompt_ignore_length = None
        return processors

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``logits_to_keep=n`` projects only the last n positions (generate asks for 1); 0 keeps all.

        ``past_key_values`` is the older name of ``cache``, which the model card's calls and older code use.
        """
        cache = cache if cache is not None else past_key_values
        tokens = input_ids if input_ids is not None else inputs_embeds
        kernels = contextlib.nullcontext() if self.training or tokens is None else decode_kernels(tokens, self.dtype)
        with kernels:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
            )
            hidden = out.last_hidden_state
            loss = None
            if labels is not None:
                loss = self.next_token_loss(hidden, labels, kwargs.get("num_items_in_batch"))
            if logits_to_keep and labels is None:
                hidden = hidden[:, -logits_to_keep:]
            # Training with labels skips the (B, T, vocab) fp32 logits: only the loss is needed.
            logits = None if self.training and labels is not None else self.lm_head(hidden).float()
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def next_token_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Next-token cross-entropy over the labelled positions (labels -100 elsewhere), the LM head run on those only.

        The mean over them, or their sum over ``num_items_in_batch`` (transformers.Trainer's count of label tokens
        in the whole accumulated, all-process batch), which makes accumulation and data parallelism exact.
        """
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        logits = self.lm_head(hidden[:, :-1][keep]).float()  # (labelled tokens, vocab)
        total = F.cross_entropy(logits, targets[keep], reduction="sum")
        return total / (keep.sum() if num_items_in_batch is None else num_items_in_batch)
