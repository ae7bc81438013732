"""DeepSeek-VL2: SigLIP tiles -> projector -> 2D token layout -> DeepSeekMoE language model.

Each image becomes one global 384x384 view and a grid of local tiles (arXiv:2412.10302, sec. 2).
Their projected features are laid out in 2D with a learned ``image_newline`` at the end of every
row and a learned ``view_seperator`` between the global and local views, then scattered into the
``<image>`` positions of the prompt's token embeddings.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from ..options import ModelLoadError, is_hub_id
from ..utils.checkpoint import check_model_folder, read_json_file
from ..utils.loading import HUB_KEYWORDS, cast_releasing_pages, load_at_stored_dtype, safetensors_files
from . import language
from .cache import InPlaceCache
from .configuration import DeepseekVLV2Config
from .language import DeepseekV2ForCausalLM
from .vision import MlpProjector, SiglipVisionTower

# On CPU a vision pass takes as many tiles as keep its widest activation (the MLP's hidden layer) under this size.
# glibc hands blocks above its largest reusable size (32 MiB) straight back to the system when freed, so a pass of
# all 7 tiles of an image (88 MB per fp32 hidden layer) faults in and zeroes ~1 GB of fresh pages on every call;
# smaller passes reuse freed memory (benchmarks/RESULTS.md, issue #14: "the page faults").
CPU_VISION_PASS_BYTES = 16 * 2**20
# Keys of the processor's batch that are no model input: ignored, so that ``**inputs`` works everywhere.
PROCESSOR_ONLY_KEYS = ("sft_format", "seq_lens", "labels")


def saved_config(path: str | os.PathLike, **hub) -> dict | None:
    """The checkpoint's config.json, local or from the Hub cache; None if there is none (from_pretrained says so)."""
    config_file = Path(path) / hub.get("subfolder", "") / "config.json"
    if not config_file.is_file():
        try:
            found = cached_file(str(path), "config.json", **hub)
        except OSError:
            found = None
        if found is None:
            return None
        config_file = Path(found)
    return read_json_file(config_file)


# transformers' quantizers that convert exact nn.Linear modules only (not subclasses such as language.Linear)
PLAIN_LINEAR_QUANT_METHODS = ("bitsandbytes", "auto-round")


def quant_method(config: DeepseekVLV2Config | dict | None) -> str | None:
    """The ``quant_method`` transformers loads the model with (a config object, or a dict in a saved config.json)."""
    quantization = config.get("quantization_config") if isinstance(config, dict) else getattr(
        config, "quantization_config", None
    )
    if isinstance(quantization, dict):
        return quantization.get("quant_method")
    return getattr(quantization, "quant_method", None)


@contextlib.contextmanager
def plain_language_linears():
    """Build the language model's linears as plain ``nn.Linear``, the only type transformers' bitsandbytes integration
    converts (it skips subclasses); those it keeps become the fast ``language.Linear`` again when the context ends."""
    fast, built = language.Linear, []

    def build(*args, **kwargs) -> nn.Linear:
        built.append(nn.Linear(*args, **kwargs))
        return built[-1]

    language.Linear = build
    try:
        yield
    finally:
        language.Linear = fast
    for module in built:  # those bitsandbytes replaced are no longer in the model
        module.__class__ = fast


def check_loading_arguments(kwargs: dict) -> None:
    """What transformers would refuse with advice that does not fit this model (a dtype shorthand; a hub page to
    request FlashAttention on, which a local folder does not have): say what to pass instead."""
    for key in ("dtype", "torch_dtype"):
        value = kwargs.get(key)
        if isinstance(value, str) and value != "auto" and not isinstance(getattr(torch, value, None), torch.dtype):
            raise ValueError(
                f"{key}={value!r} is not a dtype: pass torch.bfloat16, torch.float16 or torch.float32 (or the names "
                "'bfloat16', 'float16', 'float32'), or 'auto' for the checkpoint's dtype"
            )
    attention = kwargs.get("attn_implementation")
    if isinstance(attention, str) and attention.startswith("flash_attention"):
        raise ValueError(
            f"attn_implementation={attention!r} is not available: this implementation needs no flash-attn package "
            "and runs attention with 'sdpa' (the default: torch's scaled_dot_product_attention, fused kernels on "
            "GPU) or 'eager' (the official explicit softmax); drop the argument or pass one of those"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of dtype {str(value.dtype).removeprefix('torch.')} and shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` numbers them: counting real tokens only, so left padding is skipped."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class DeepseekVLV2PreTrainedModel(PreTrainedModel):
    config_class = DeepseekVLV2Config
    config: DeepseekVLV2Config
    base_model_prefix = "deepseek_vl_v2"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "DeepseekV2DecoderLayer"]
    _supports_sdpa = True


class DeepseekVLV2ForCausalLM(DeepseekVLV2PreTrainedModel):
    """The vision-language model; ``language`` (alias ``language_model``) is the generating LM."""

    # Tiles encoded per vision pass at most (on CPU fewer: CPU_VISION_PASS_BYTES).
    vision_batch_size = 32
    # Set for FSDP training (deepseek_vl.train): every forward then runs the vision tower exactly once, all tiles in one
    # pass and one zero tile (weighted 0) for a text-only batch, since each sharded vision block gathers its weights
    # collectively and every process must make the same calls.
    vision_in_lockstep = False

    def __init__(self, config: DeepseekVLV2Config) -> None:
        super().__init__(config)
        self.vision = SiglipVisionTower(config.vision_config)
        self.projector = MlpProjector(config.projector_config)
        width = config.projector_config.n_embed
        self.image_newline = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.view_seperator = nn.Parameter(torch.randn(width) / math.sqrt(width))  # checkpoint's spelling
        self.language = DeepseekV2ForCausalLM(config.language_config)
        self.post_init()

    @property
    def language_model(self) -> DeepseekV2ForCausalLM:
        return self.language

    @classmethod
    def get_init_context(cls, dtype, is_quantized, _is_ds_init_called, allow_all_kernels, config=None) -> list:
        """transformers' contexts for building the model in ``from_pretrained``; with a ``BitsAndBytesConfig`` or an
        AutoRound checkpoint the language model's linears are built so that the quantizer converts them."""
        contexts = super().get_init_context(dtype, is_quantized, _is_ds_init_called, allow_all_kernels, config)
        return [*contexts, plain_language_linears()] if quant_method(config) in PLAIN_LINEAR_QUANT_METHODS else contexts

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load strictly: a missing, unexpected or mis-shaped weight is an error naming it, never a random layer.

        ``quantize="int8" | "int4" | "nf4"`` (``quantize_vision=True`` for the vision linears too,
        ``quantize_lm_head=True`` for ``lm_head``) quantizes the language model while it loads, tensor by tensor;
        a folder saved from a quantized model loads as it is.
        """
        quantize = kwargs.pop("quantize", None)
        check_loading_arguments(kwargs)
        hub = {key: kwargs[key] for key in HUB_KEYWORDS if key in kwargs}
        local = Path(pretrained_model_name_or_path) / hub.get("subfolder", "")
        if kwargs.get("config") is None and kwargs.get("state_dict") is None:
            if local.is_dir():
                check_model_folder(local)  # a missing, unreadable, damaged or foreign file: one error naming it
            elif not is_hub_id(pretrained_model_name_or_path):
                raise ModelLoadError(
                    f"{str(local)!r} is neither a checkpoint folder nor a Hub repo id "
                    "like 'deepseek-ai/deepseek-vl2-tiny': pass the folder that holds config.json and the weights"
                )
        saved = (saved_config(pretrained_model_name_or_path, **hub) or {}) if quantize is None else {}
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if quant_method(saved) == "auto-round" and dtype in (torch.float32, "float32"):
            raise ValueError(
                "This AutoRound checkpoint runs in bfloat16 or float16 (auto-round would turn float32 into float16): "
                "pass dtype=torch.bfloat16"
            )
        if quantize is not None or saved.get("quantization") is not None:
            from ..quantization import load_quantized

            return load_quantized(cls, pretrained_model_name_or_path, quantize, **kwargs)
        if kwargs.pop("quantize_vision", False) or kwargs.pop("quantize_lm_head", False):
            raise ValueError(
                "quantize_vision=True or quantize_lm_head=True needs quantize='int8', 'int4' or 'nf4' as well"
            )
        if kwargs.get("quantization_config") is not None:  # transformers' TorchAoConfig, BitsAndBytesConfig
            from ..quantization import default_kept_modules

            default_kept_modules(kwargs["quantization_config"])
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # report mis-shaped weights below, by name, instead of a bare error
        cast_to = load_at_stored_dtype(pretrained_model_name_or_path, kwargs)  # peak: the model, not it + the file
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {
            "missing": sorted(info.get("missing_keys", [])),
            "unexpected": sorted(info.get("unexpected_keys", [])),
            "mismatched": sorted(str(k) for k in info.get("mismatched_keys", [])),
        }
        if any(problems.values()):
            lines = [f"{kind} weights ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                     for kind, keys in problems.items() if keys]
            raise ValueError(
                f"The checkpoint at {pretrained_model_name_or_path} does not match the DeepSeek-VL2 architecture of "
                f"its config.json:\n  " + "\n  ".join(lines) + "\nCheck that the folder is complete (all shards of "
                "model.safetensors.index.json) and that config.json belongs to these weights."
            )
        if cast_to is not None:
            cast_releasing_pages(model, cast_to, safetensors_files(pretrained_model_name_or_path, **hub))
        if quant_method(model.config) == "bitsandbytes":
            from ..quantization import fit_bitsandbytes_cpu_kernel

            fit_bitsandbytes_cpu_kernel(model)
        return (model, info) if want_info else model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language.get_input_embeddings()

    def prepare_inputs_embeds(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        **unused,
    ) -> torch.Tensor:
        """Token embeddings with every ``<image>`` position replaced by its image feature, in order.

        images: (B, max_tiles, 3, 384, 384); images_spatial_crop: (B, max_images, 2) holding
        [tiles across, tiles down] per image, [0, 0] for padding. Extra processor keys are ignored.
        """
        self.check_inputs(input_ids, images, images_seq_mask, images_spatial_crop)
        embeds = self.get_input_embeddings()(input_ids)
        if images is None or not bool(images_spatial_crop.any()):
            if self.vision_in_lockstep:  # every weight an image uses, weighted 0: a (zero) gradient on each process
                blank = embeds.new_zeros(1, 3, *self.vision.patch_embed.img_size)
                unused = self.encode_tiles(blank).sum() + self.image_newline.sum() + self.view_seperator.sum()
                return embeds + 0.0 * unused.to(embeds.dtype)
            return embeds
        crops = [[(w, h) for w, h in row if w and h] for row in images_spatial_crop.tolist()]
        counts = [sum(1 + w * h for w, h in row) for row in crops]  # a global view + the local tiles per image
        for b, (row, count) in enumerate(zip(crops, counts)):
            if count > images.shape[1]:
                raise ValueError(
                    f"images_spatial_crop of row {b} ({row}) needs {count} tiles but images holds {images.shape[1]}: "
                    "images and images_spatial_crop must come from the same processor call."
                )
        tiles = torch.cat([images[b, :count] for b, count in enumerate(counts)])
        features = self.encode_tiles(tiles)  # (tiles, h*w, D)
        mask = images_seq_mask.bool()
        if embeds.is_leaf and embeds.requires_grad:  # made so by peft's input hook under gradient checkpointing
            embeds = embeds.clone()  # the rows below are written in place
        start = 0
        for b, row in enumerate(crops):
            if not row:
                continue
            sequences = []
            for w, h in row:
                sequences.append(self.tile_layout(features[start : start + 1 + w * h], w, h))
                start += 1 + w * h
            sequence = torch.cat(sequences)
            expected = int(mask[b].sum())
            if sequence.shape[0] != expected:
                raise ValueError(
                    f"Row {b} has {expected} <image> token positions but its images need {sequence.shape[0]}: "
                    "images_seq_mask, images_spatial_crop and input_ids must come from the same processor call."
                )
            embeds[b, mask[b]] = sequence.to(embeds.dtype)
        return embeds

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None,
        images_seq_mask: torch.Tensor | None,
        images_spatial_crop: torch.Tensor | None,
    ) -> None:
        """Refuse what is not one processor batch on the model's device, naming the fix, instead of an indexing error
        deep in the layout or text embeddings where the images should be."""
        batched = "pass the processor's batch (force_batchify=True, the default, or processor.batchify([sample]))"
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dim() != 2
            or input_ids.dtype not in (torch.long, torch.int)
        ):
            raise ValueError(f"input_ids must be (batch, tokens) token ids, got {_describe(input_ids)}; {batched}")
        batch = input_ids.shape[0]
        if images_seq_mask is not None and images_seq_mask.shape != input_ids.shape:
            raise ValueError(
                f"images_seq_mask is {_describe(images_seq_mask)}, input_ids {_describe(input_ids)}; {batched}"
            )
        crop = images_spatial_crop
        if crop is not None and (crop.dim() != 3 or crop.shape[::2] != (batch, 2)):
            raise ValueError(f"images_spatial_crop must be (batch, images, 2), got {_describe(crop)}; {batched}")
        tile = (3, *self.vision.patch_embed.img_size)
        tiles_ok = images is None or (images.dim() == 5 and images.shape[0] == batch and images.shape[2:] == tile)
        if not tiles_ok or (images is not None and not images.is_floating_point()):
            shape = f"(batch, tiles, {', '.join(map(str, tile))})"
            raise ValueError(f"images must be float {shape} tiles, got {_describe(images)}; {batched}")
        if images is not None and (images_seq_mask is None or crop is None):
            raise ValueError(
                "images were given without images_seq_mask and images_spatial_crop: pass the processor's output "
                "unchanged (model.prepare_inputs_embeds(**inputs))"
            )
        if images_seq_mask is not None and bool(images_seq_mask.any()) and (images is None or not bool(crop.any())):
            raise ValueError(
                f"images_seq_mask marks {int(images_seq_mask.sum())} <image> positions but no images were given: "
                "pass images and images_spatial_crop of the same processor call (model.prepare_inputs_embeds(**inputs))"
            )
        embedding = self.get_input_embeddings()
        if not hasattr(embedding, "_hf_hook") and input_ids.device != embedding.weight.device:  # hooks move inputs
            raise ValueError(
                f"input_ids are on {input_ids.device} but the model is on {embedding.weight.device}: move the "
                "processor's output with inputs.to(model.device)"
            )
        if images is not None and images.device != input_ids.device:
            raise ValueError(
                f"images are on {images.device} but input_ids on {input_ids.device}: move the whole processor output "
                "with inputs.to(model.device)"
            )

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector on (tiles, 3, H, W), in passes of ``tiles_per_pass`` tiles."""
        weight = self.vision.patch_embed.proj.weight
        dtype = weight.dtype
        batches = tiles.split(len(tiles) if self.vision_in_lockstep else self.tiles_per_pass(weight.device, dtype))
        return torch.cat([self.projector(self.vision(batch.to(dtype))) for batch in batches])

    def tiles_per_pass(self, device: torch.device, dtype: torch.dtype) -> int:
        """``vision_batch_size``; on CPU only as many as keep the widest activation under ``CPU_VISION_PASS_BYTES``."""
        if device.type != "cpu":
            return self.vision_batch_size
        tile_bytes = self.vision.patch_embed.num_patches * self.vision.blocks[0].mlp.fc1.out_features * dtype.itemsize
        return max(1, min(self.vision_batch_size, CPU_VISION_PASS_BYTES // tile_bytes))

    def tile_layout(self, features: torch.Tensor, width_tiles: int, height_tiles: int) -> torch.Tensor:
        """2D layout of one image: rows of the global view and of the local grid, each closed by a newline."""
        _, hw, dim = features.shape
        side = int(math.isqrt(hw))
        newline = self.image_newline.to(features.dtype)
        global_view = features[0].view(side, side, dim)
        global_view = torch.cat([global_view, newline.expand(side, 1, dim)], dim=1).view(-1, dim)  # (h*(w+1), D)
        local = features[1:].view(height_tiles, width_tiles, side, side, dim)
        local = local.permute(0, 2, 1, 3, 4).reshape(height_tiles * side, width_tiles * side, dim)
        local = torch.cat([local, newline.expand(height_tiles * side, 1, dim)], dim=1).view(-1, dim)
        separator = self.view_seperator.to(features.dtype)[None]
        if self.config.global_view_pos == "head":
            return torch.cat([global_view, separator, local])
        return torch.cat([local, separator, global_view])

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        sft_format: list[str] | None = None,
        seq_lens: list[int] | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Accepts the processor output as is (``model(**inputs)``); ``sft_format``/``seq_lens`` are ignored.

        Without ``position_ids`` every row is numbered 0..T-1, as the official forward does.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids (with the images) or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        if labels is not None and (labels.shape != inputs_embeds.shape[:2] or labels.dtype != torch.long):
            raise ValueError(
                f"labels must be int64 (batch, tokens) {tuple(inputs_embeds.shape[:2])} as the input, got "
                f"{_describe(labels)}: pass the labels of the same processor batch"
            )
        return self.language(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            labels=labels,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            logits_to_keep=logits_to_keep,
            num_items_in_batch=kwargs.get("num_items_in_batch"),  # transformers.Trainer's loss normaliser
        )

    @torch.no_grad()
    def incremental_prefilling(
        self,
        input_ids: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int = 1024,
        inputs_embeds: torch.Tensor | None = None,
        **processor_keys,
    ) -> tuple[torch.Tensor, Cache]:
        """Fill the cache with all prompt tokens but the last, ``chunk_size`` at a time, to bound peak memory.

        Returns ``(inputs_embeds, cache)`` for ``generate(inputs_embeds=..., input_ids=..., past_key_values=cache)``,
        which then runs only the last prompt token. The cache stays on the model's device. ``inputs_embeds`` (of
        ``prepare_inputs_embeds``) stands for the ids and images, as in the official signature; the processor's
        ``sft_format``, ``seq_lens`` and ``labels`` are ignored, so ``**inputs`` works.
        """
        unknown = sorted(set(processor_keys) - set(PROCESSOR_ONLY_KEYS))
        if unknown:
            raise TypeError(f"incremental_prefilling() got unexpected keyword arguments {unknown}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("incremental_prefilling needs input_ids (with the images) or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        if attention_mask is None:
            attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        positions = generation_position_ids(attention_mask)
        cache = InPlaceCache()
        for start in range(0, inputs_embeds.shape[1] - 1, chunk_size):
            end = min(start + chunk_size, inputs_embeds.shape[1] - 1)
            self.language.model(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=positions[:, start:end],
                cache=cache,
                use_cache=True,
            )
        return inputs_embeds, cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """``language.generate`` on the image-filled embeddings; with ``input_ids`` the output starts with them."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("generate needs input_ids (with images) or inputs_embeds")
            inputs_embeds = self.prepare_inputs_embeds(input_ids, images, images_seq_mask, images_spatial_crop)
        if past_key_values is not None:  # language.generate cuts it back to the prompt (see there)
            kwargs["cache"] = past_key_values
        for ignored in PROCESSOR_ONLY_KEYS:
            kwargs.pop(ignored, None)
        return self.language.generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs
        )
