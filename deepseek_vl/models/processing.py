"""DeepSeek-VL2 processor: chat formatting, tokenization with `<image>` expansion, dynamic tiling and batching.

The outputs (sft_format, ids, labels, masks, crops and float tiles) equal the official `DeepseekVLV2Processor`
bit for bit. These official quirks are reproduced on purpose, because the released models were trained with them:

- conversation mode: `system_prompt` only appears in `sft_format`, never in `input_ids` (prompt mode tokenizes it);
- assistant answers are tokenized on their own, without the space `sft_format` shows after "<|Assistant|>:";
- a leading `system` role message shifts the separator alternation of `sft_format` (see conversation.py).

Official crashes and asserts are not reproduced: `prompt=` with `images=None` is text-only, `images_seq_mask` stays
bool after padding, and invalid inputs raise a `ValueError` that says what to fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import AutoProcessor, PreTrainedTokenizerFast

from deepseek_vl.models.chat_template import apply_chat_template
from deepseek_vl.models.configuration import DeepseekVLV2Config
from deepseek_vl.models.conversation import get_conv_template
from deepseek_vl.options import ModelLoadError, is_hub_id
from deepseek_vl.utils.checkpoint import damaged_json_file, read_json_file
from deepseek_vl.utils.io import ImageLoadError, ImageNotFoundError, load_image, load_pil_images

__all__ = [
    "BatchCollateOutput", "DeepseekVLV2Processor", "TokenizedWithImages", "VLChatProcessorOutput",
    "select_best_resolution",
]  # fmt: skip

PROCESSOR_CONFIG_NAME = "processor_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GROUNDING_TOKENS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
SYSTEM_ROLE = "system"
SYSTEM_ROLES = (SYSTEM_ROLE, "deepseekapi-sys")  # the official processor takes both
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "revision", "token")

_CONFIG_KEYS = (
    "add_special_token", "candidate_resolutions", "downsample_ratio", "ignore_id", "image_mean", "image_std",
    "image_token", "mask_prompt", "normalize", "pad_token", "patch_size", "sft_format",
)  # fmt: skip
Messages = list[dict[str, Any]]


def select_best_resolution(
    image_size: tuple[int, int], candidate_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """Pick the (width, height) canvas that keeps the most image pixels, then wastes the least, then comes first.

    The image is scaled to fit each candidate keeping its aspect ratio; "effective" pixels are capped at the
    original pixel count so upscaling a small image earns nothing.
    """
    width, height = image_size
    best, best_effective, best_waste = None, -1, math.inf
    for cand_w, cand_h in candidate_resolutions:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_w, cand_h), effective, waste
    return best


class _FieldMapping:
    """Dict-style access to a dataclass, so outputs can be unpacked with `**` and indexed like the official ones."""

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(f"{key!r}; available keys: {self.keys()}")
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def items(self) -> list[tuple[str, Any]]:
        return [(key, getattr(self, key)) for key in self.keys()]

    def to(self, device: torch.device | str | torch.dtype | None = None, dtype: torch.dtype | None = None):
        """Move every tensor to `device` in place; `dtype` applies to floating tensors only (the images), so
        `.to(torch.bfloat16)` casts the images and leaves the ids alone."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                setattr(self, key, value.to(device=device, dtype=dtype if value.is_floating_point() else None))
        return self


@dataclass
class VLChatProcessorOutput(_FieldMapping):
    """One unbatched sample (T tokens, N images), as returned by `process_one`."""

    sft_format: str
    input_ids: torch.Tensor  # int64 [T]
    target_ids: torch.Tensor  # int64 [T], ignore_id at image tokens (and prompt tokens if mask_prompt)
    images: torch.Tensor  # float32 [tiles, 3, S, S]: per image the global view then local tiles row by row
    images_seq_mask: torch.Tensor  # bool [T], True at <image> token positions
    images_spatial_crop: torch.Tensor  # int64 [N, 2] = (tiles across, tiles down); [[0, 0]] without images
    num_image_tokens: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class BatchCollateOutput(_FieldMapping):
    """A padded batch; its keys are exactly the keyword arguments the model's forward accepts."""

    sft_format: list[str]
    input_ids: torch.Tensor  # int64 [B, T], padded with pad_id
    labels: torch.Tensor  # int64 [B, T], padded with ignore_id
    attention_mask: torch.Tensor  # bool [B, T]
    images_seq_mask: torch.Tensor  # bool [B, T]
    images: torch.Tensor  # float32 [B, max_tiles, 3, S, S], zero-padded
    images_spatial_crop: torch.Tensor  # int64 [B, max_images, 2], padded with [0, 0]
    seq_lens: list[int]  # unpadded lengths


class TokenizedWithImages(NamedTuple):
    input_ids: list[int]
    images: list[torch.Tensor]  # one float32 [3, S, S] tensor per tile
    images_seq_mask: list[bool]
    images_spatial_crop: list[list[int]]
    num_image_tokens: list[int]


class DeepseekVLV2Processor:
    """Turns prompts or chat conversations plus PIL images into DeepSeek-VL2 model inputs.

    A plain class rather than a transformers `ProcessorMixin`: the official processor_config.json does not follow
    ProcessorMixin's conventions, and everything it needs is a tokenizer plus the settings below.
    """

    # Set by the serving engine: an LRU map ``get(key)``/``put(key, value, nbytes)`` reusing the tiles of an image
    # sent again (the next turn of a conversation); None tiles every image.
    tile_cache: Any = None

    def __init__(
        self,
        tokenizer,
        candidate_resolutions: Sequence[Sequence[int]],
        patch_size: int,
        downsample_ratio: int,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        normalize: bool = True,
        image_token: str = "<image>",
        pad_token: str = "<｜▁pad▁｜>",
        add_special_token: bool = False,
        sft_format: str = "deepseek",
        mask_prompt: bool = True,
        ignore_id: int = -100,
    ):
        self.candidate_resolutions = [tuple(int(x) for x in res) for res in candidate_resolutions]
        self.image_size = self.candidate_resolutions[0][0]
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.normalize = normalize
        self.image_token = image_token
        self.pad_token = pad_token
        self.add_special_token = add_special_token
        self.sft_format = sft_format
        self.mask_prompt = mask_prompt
        self.ignore_id = ignore_id

        # Same token setup as the official processor; a no-op for the released tokenizers, which ship all of them.
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": pad_token})
        vocab = tokenizer.get_vocab()
        missing = [t for t in (image_token, *GROUNDING_TOKENS, "<|User|>", "<|Assistant|>") if t not in vocab]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

        self._pad_color = tuple(int(m * 255) for m in self.image_mean)
        self._mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> DeepseekVLV2Processor:
        """Load from a local folder (no network) or a Hub repo id.

        Hub arguments (revision, cache_dir, token, local_files_only, force_download) go to the downloads; any
        other keyword overrides the matching processor_config.json entry (e.g. `mask_prompt=True`).
        """
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        for key in ("trust_remote_code", "_from_auto"):  # what AutoProcessor passes; this class is local code
            kwargs.pop(key, None)
        source = os.fspath(pretrained_model_name_or_path)
        path = Path(source).expanduser()
        if path.is_dir():
            missing = [name for name in (PROCESSOR_CONFIG_NAME, *TOKENIZER_FILES) if not (path / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{str(path)!r} has no {' or '.join(missing)}; a DeepSeek-VL2 processor folder needs "
                    f"{PROCESSOR_CONFIG_NAME} and {' + '.join(TOKENIZER_FILES)} (copy them from the model repo or "
                    "write them with DeepseekVLV2Processor.save_pretrained)."
                )
            config_file, tokenizer_source = path / PROCESSOR_CONFIG_NAME, str(path)
        elif not is_hub_id(source):
            raise FileNotFoundError(f"{source!r} is neither a folder nor a Hub repo id of the form 'owner/name'.")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

            from deepseek_vl.utils.hub import hub_unreachable

            try:
                if hub_unreachable():  # no network: the cache at once, not after five retries
                    hub_kwargs.setdefault("local_files_only", True)
                config_file = hf_hub_download(source, PROCESSOR_CONFIG_NAME, **hub_kwargs)
            except LocalEntryNotFoundError as error:
                raise FileNotFoundError(
                    f"Could not download {source!r} (offline or unreachable) and it is not in the local cache; "
                    "pass a local folder holding the checkpoint instead."
                ) from error
            except EntryNotFoundError as error:
                raise FileNotFoundError(f"Hub repo {source!r} has no {PROCESSOR_CONFIG_NAME}.") from error
            tokenizer_source = source

        config = read_json_file(Path(config_file))
        if not isinstance(config, dict):
            raise ModelLoadError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
        config = {key: value for key, value in config.items() if key in _CONFIG_KEYS} | kwargs
        # tokenizer.json fully describes the tokenizer. The official tokenizer_config.json names LlamaTokenizer, for
        # which AutoTokenizer loads this same fast tokenizer with advice to edit that file: ask for it directly.
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_source, **hub_kwargs)
        except Exception as error:  # tokenizers raises a bare Exception; none of its errors names the file
            damaged = damaged_json_file(Path(config_file).parent, (*TOKENIZER_FILES, "config.json"))
            if damaged is None:
                raise
            raise damaged from error
        _restore_special_token_flags(tokenizer, Path(config_file).with_name("tokenizer_config.json"))
        return cls(tokenizer, **config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write processor_config.json (the official layout) and the tokenizer files."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {key: getattr(self, key) for key in _CONFIG_KEYS} | {"processor_class": type(self).__name__}
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (directory / PROCESSOR_CONFIG_NAME).write_text(text, encoding="utf-8")
        self.tokenizer.save_pretrained(directory)

    def format_messages(self, conversations: Messages, sft_format: str | None = None, system_prompt: str = "") -> str:
        """Render a conversation as the `sft_format` string (informational: ids are built turn by turn)."""
        conv = get_conv_template(sft_format or self.sft_format)
        conv.set_system_message(system_prompt)
        for message in conversations:
            conv.append_message(message["role"], str(message["content"]).strip())
        return conv.get_prompt().strip()

    def apply_chat_template(self, conversation: Messages, **kwargs: Any) -> Any:
        """transformers/OpenAI messages (string or `[{"type": "image"}, {"type": "text", ...}]` content) -> the
        official prompt string; `add_generation_prompt`, `tokenize`, `system_prompt` as in chat_template.py."""
        return apply_chat_template(self, conversation, **kwargs)

    def format_prompts(self, prompts: str, sft_format: str | None = None, system_prompt: str = "") -> str:
        """Wrap a raw prompt as one user turn followed by an open assistant turn."""
        conv = get_conv_template(sft_format or self.sft_format)
        conv.set_system_message(system_prompt)
        conv.append_message(conv.roles[0], prompts.strip())
        conv.append_message(conv.roles[1], "")
        return conv.get_prompt().strip()

    def decode(self, t: Sequence[int] | torch.Tensor, **kwargs: Any) -> str:
        """``tokenizer.decode`` (the official processor's method): ids of an answer -> text, grounding tags kept
        unless ``skip_special_tokens=True``."""
        try:
            return self.tokenizer.decode(t, **kwargs)
        except (OverflowError, TypeError) as error:  # tokenizers' messages name neither the value nor the fix
            negative = isinstance(error, OverflowError)
            hint = f"; labels hold {self.ignore_id} where unlabelled: decode labels[labels != {self.ignore_id}]"
            raise ValueError(
                f"decode takes token ids (non-negative ints: a list, or a tensor such as outputs[0]), got "
                f"{_short_repr(t)}{hint if negative else ''}."
            ) from error

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        """One text per row of ``sequences`` (transformers processors' method), e.g. every answer of a batch."""
        return [self.decode(row, **kwargs) for row in sequences]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        _check_unicode(text)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def tokenize_with_images(
        self,
        conversation: str,
        images: Sequence[Image.Image],
        bos: bool = True,
        eos: bool = True,
        cropping: bool = True,
    ) -> TokenizedWithImages:
        """Tokenize text whose `<image>` tags are replaced by each image's block of image tokens.

        The text between tags is encoded piece by piece (BPE never merges across an image), and per image the
        tiles are: global view, then the local tiles of its best-fitting canvas, row by row.
        """
        if conversation.count(self.image_token) != len(images):
            raise ValueError(
                f"The text has {conversation.count(self.image_token)} {self.image_token} tags but {len(images)} "
                f"images were given; put exactly one {self.image_token} where each image belongs."
            )
        *text_splits, last_split = conversation.split(self.image_token)
        ids, seq_mask, tiles, crops, num_image_tokens = [], [], [], [], []
        for text, image in zip(text_splits, images):
            text_ids = self.encode(text, bos=False)
            ids += text_ids
            seq_mask += [False] * len(text_ids)

            image_tiles, (num_w, num_h) = self._tile(image, cropping)
            tiles += list(image_tiles)
            crops.append([num_w, num_h])
            count = self._image_tokens(num_w, num_h)
            ids += [self.image_token_id] * count
            seq_mask += [True] * count
            num_image_tokens.append(count)

        text_ids = self.encode(last_split, bos=False)
        ids = [self.bos_id] * bos + ids + text_ids + [self.eos_id] * eos
        seq_mask = [False] * bos + seq_mask + [False] * (len(text_ids) + eos)
        return TokenizedWithImages(ids, tiles, seq_mask, crops, num_image_tokens)

    def image_token_count(self, image_size: tuple[int, int], cropping: bool = True) -> int:
        """Prompt tokens of one image of this (width, height), without the pixels: for budgets before decoding."""
        size = self.image_size
        best_w, best_h = select_best_resolution(image_size, self.candidate_resolutions) if cropping else (size, size)
        return self._image_tokens(best_w // size, best_h // size)

    def _image_tokens(self, num_w: int, num_h: int) -> int:
        side = math.ceil((self.image_size // self.patch_size) / self.downsample_ratio)  # tokens per tile row/column
        # global view: side rows of (side + 1 newline); 1 view separator; local grid rows of (num_w*side + 1)
        return side * (side + 1) + 1 + (num_h * side) * (num_w * side + 1)

    def _tile(self, image: Image.Image, cropping: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        """Return the [1 + w*h, 3, S, S] tiles of one image and its (w, h) tile grid."""
        if self.tile_cache is None or image.width == 0 or image.height == 0:
            return self._tile_image(image, cropping)
        key = (hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest(), image.mode, image.size, cropping)
        tiles = self.tile_cache.get(key)
        if tiles is None:
            tiles = self._tile_image(image, cropping)
            self.tile_cache.put(key, tiles, tiles[0].nbytes)
        return tiles

    def _tile_image(self, image: Image.Image, cropping: bool) -> tuple[torch.Tensor, tuple[int, int]]:
        if image.width == 0 or image.height == 0:
            raise ValueError(f"An image is empty ({image.width}x{image.height} pixels); pass images with pixels.")
        if image.mode != "RGB":  # RGBA, L, P, I;16, ... as load_image converts them (16-bit scaled, not clipped)
            image = load_image(image, max_pixels=None)
        size = self.image_size
        best_w, best_h = select_best_resolution(image.size, self.candidate_resolutions) if cropping else (size, size)
        global_view = self._to_tensor(ImageOps.pad(image, (size, size), color=self._pad_color))
        local_view = self._to_tensor(ImageOps.pad(image, (best_w, best_h), color=self._pad_color))
        num_w, num_h = best_w // size, best_h // size
        # [3, h*S, w*S] -> [h*w, 3, S, S] in row-major tile order, same values as PIL crops of each tile
        local_tiles = local_view.view(3, num_h, size, num_w, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
        return torch.cat([global_view[None], local_tiles]), (num_w, num_h)

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        """ToTensor + Normalize without torchvision; the same float32 ops, so bit-identical to it."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        return (pixels - self._mean) / self._std if self.normalize else pixels

    def process_one(
        self,
        prompt: str | None = None,
        conversations: Messages | None = None,
        images: Sequence[Image.Image] | None = None,
        apply_sft_format: bool = False,
        inference_mode: bool = True,
        system_prompt: str = "",
        **kwargs: Any,
    ) -> VLChatProcessorOutput:
        """Process one prompt or one conversation into an unbatched sample.

        `images=None` means: no images for a prompt, the messages' "images" entries for a conversation.
        `inference_mode` drops the final eos so the model continues the last (usually empty) assistant turn.
        """
        _warn_unused(kwargs)
        if (prompt is None) == (conversations is None):
            raise ValueError("Pass exactly one of prompt= (a string) or conversations= (a list of messages).")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}; batch with processor(prompt=[...]).")
        if not isinstance(system_prompt, str):  # the official template would render None as the text "None"
            raise ValueError(f"system_prompt must be a str ('' for none), got {type(system_prompt).__name__}.")
        if conversations is not None:
            num_tags = self._check_conversation(conversations, inference_mode)
            if system_prompt:
                warnings.warn(
                    "system_prompt= only shows in sft_format: the official processor does not tokenize it in "
                    "conversation mode, so the model never sees it. Start the conversation with "
                    "{'role': 'system', 'content': ...} to give the model a system prompt.",
                    stacklevel=3,
                )
        if images is None:
            images = [] if prompt is not None else load_pil_images(conversations)
        _check_images(images)

        if prompt is not None:
            sft_format = self.format_prompts(prompt, system_prompt=system_prompt) if apply_sft_format else prompt
            ids, tiles, seq_mask, crops, num_image_tokens = self.tokenize_with_images(
                sft_format, images, bos=True, eos=True, cropping=len(images) <= 2
            )
            targets = list(ids)  # mask_prompt does not apply to raw prompts (official behaviour)
        else:
            if num_tags != len(images):
                raise ValueError(
                    f"The conversation has {num_tags} {self.image_token} tags but {len(images)} images were given; "
                    f"put exactly one {self.image_token} in the user messages for each image."
                )
            sft_format = self.format_messages(conversations, system_prompt=system_prompt)
            ids, targets, tiles, seq_mask, crops, num_image_tokens = self._tokenize_conversation(conversations, images)

        input_ids = torch.tensor(ids, dtype=torch.long)
        target_ids = torch.tensor(targets, dtype=torch.long)
        target_ids[input_ids == self.image_token_id] = self.ignore_id
        images_seq_mask = torch.tensor(seq_mask, dtype=torch.bool)
        if inference_mode:  # ids always end with eos here: the final turn is an assistant turn or a raw prompt
            input_ids, target_ids, images_seq_mask = input_ids[:-1], target_ids[:-1], images_seq_mask[:-1]

        return VLChatProcessorOutput(
            sft_format=sft_format,
            input_ids=input_ids,
            target_ids=target_ids,
            # a text-only sample carries one all-zero tile and crop [0, 0], as in the official code
            images=torch.stack(tiles) if tiles else torch.zeros(1, 3, self.image_size, self.image_size),
            images_seq_mask=images_seq_mask,
            images_spatial_crop=torch.tensor(crops or [[0, 0]], dtype=torch.long),
            num_image_tokens=num_image_tokens,
        )

    def _tokenize_conversation(self, conversation: Messages, images: Sequence[Image.Image]):
        """Build ids turn by turn, not from sft_format (official behaviour).

        bos; a user turn is `encode("<|User|>: {content}\\n\\n<|Assistant|>:")` with its images expanded; an
        assistant turn is `encode(answer) + [eos]`, without the leading space; a leading system message is its content.
        """
        user_role, assistant_role = get_conv_template(self.sft_format).roles
        cropping = len(images) <= 2  # decided per conversation, as in the official code
        ids, targets, seq_mask = [self.bos_id], [self.bos_id], [False]
        tiles, crops, num_image_tokens = [], [], []
        image_index = 0
        for message in conversation:
            content = str(message["content"]).strip()
            if message["role"] in (user_role, "user"):
                turn = get_conv_template(self.sft_format)
                turn.append_message(user_role, content)
                turn.append_message(assistant_role, "")
                n = content.count(self.image_token)
                out = self.tokenize_with_images(
                    turn.get_prompt(), images[image_index : image_index + n], bos=False, eos=False, cropping=cropping
                )
                image_index += n
                turn_ids, turn_mask, prompt_part = out.input_ids, out.images_seq_mask, True
                tiles += out.images
                crops += out.images_spatial_crop
                num_image_tokens += out.num_image_tokens
            else:  # an assistant turn, or the leading system message (validated by _check_conversation)
                prompt_part = message["role"] in SYSTEM_ROLES
                turn_ids = self.encode(content, bos=False, eos=not prompt_part)
                turn_mask = [False] * len(turn_ids)
            ids += turn_ids
            targets += [self.ignore_id] * len(turn_ids) if prompt_part and self.mask_prompt else turn_ids
            seq_mask += turn_mask
        return ids, targets, tiles, seq_mask, crops, num_image_tokens

    def _check_conversation(self, conversation: Messages, inference_mode: bool) -> int:
        """Validate the messages before any image is loaded; return the number of image tags."""
        user_role, assistant_role = get_conv_template(self.sft_format).roles
        if not isinstance(conversation, (list, tuple)):
            raise ValueError(
                f"conversations must be a list of messages (or a list of such lists), got {type(conversation).__name__}"
                f"; e.g. [{{'role': '{user_role}', 'content': '...'}}, {{'role': '{assistant_role}', 'content': ''}}]."
            )
        if not conversation:
            raise ValueError(
                "The conversation is empty; pass at least one message, e.g. a user turn and an empty assistant turn."
            )
        num_tags = 0
        for index, message in enumerate(conversation):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"Message {index} must be a dict with 'role' and 'content' keys, got {message!r}.")
            role, content = message["role"], message["content"]
            if not isinstance(content, str):
                raise ValueError(
                    f"Message {index} has {type(content).__name__} content, not a string; for content parts "
                    "([{'type': 'image'}, {'type': 'text', 'text': ...}]) use processor.apply_chat_template."
                )
            if role in (user_role, "user"):
                num_tags += content.count(self.image_token)
            elif role in (assistant_role, "assistant", *SYSTEM_ROLES):
                if role in SYSTEM_ROLES and index != 0:
                    raise ValueError(f"A {SYSTEM_ROLE!r} message may only be the first message; it is message {index}.")
                if self.image_token in content:
                    raise ValueError(
                        f"Message {index} ({role}) contains {self.image_token}; images may only appear in user "
                        f"({user_role}) messages. Move the tag (and its image) into a user turn."
                    )
            else:
                raise ValueError(
                    f"Unknown role {role!r} in message {index}; use {user_role!r} (or 'user'), {assistant_role!r} "
                    f"(or 'assistant'), or {SYSTEM_ROLE!r} for a first system message."
                )
        if inference_mode and conversation[-1]["role"] not in (assistant_role, "assistant"):
            raise ValueError(
                f"With inference_mode=True the conversation must end with an assistant message that the model "
                f"completes; append {{'role': '{assistant_role}', 'content': ''}} (or pass inference_mode=False)."
            )
        return num_tags

    def __call__(
        self,
        *,
        prompt: str | Sequence[str] | None = None,
        conversations: Messages | Sequence[Messages] | None = None,
        images: Sequence[Image.Image] | Sequence[Sequence[Image.Image]] | None = None,
        apply_sft_format: bool = False,
        force_batchify: bool = True,
        inference_mode: bool = True,
        system_prompt: str = "",
        **kwargs: Any,
    ) -> BatchCollateOutput | VLChatProcessorOutput | list[VLChatProcessorOutput]:
        """Process one prompt/conversation, or a list of them (each processed alone, then left-padded).

        For a list, `images` is None (prompts: no images; conversations: each message's "images" entries) or one
        list of images per item. `force_batchify=False` returns the unbatched sample(s).
        """
        _warn_unused(kwargs)
        if (prompt is None) == (conversations is None):
            raise ValueError("Pass exactly one of prompt= (a string) or conversations= (a list of messages).")
        use_prompt = prompt is not None
        items = prompt if use_prompt else conversations
        is_list = isinstance(items, (list, tuple)) and (
            use_prompt or (len(items) > 0 and isinstance(items[0], (list, tuple)))
        )
        items, per_item_images = (items, _split_images(images, len(items))) if is_list else ([items], [images])
        samples = []
        for index, (item, item_images) in enumerate(zip(items, per_item_images)):
            try:
                samples.append(
                    self.process_one(
                        prompt=item if use_prompt else None,
                        conversations=None if use_prompt else item,
                        images=item_images,
                        apply_sft_format=apply_sft_format,
                        inference_mode=inference_mode,
                        system_prompt=system_prompt,
                    )
                )
            except ValueError as error:  # name the item of a batch; the processor's own errors take one message
                if len(items) == 1 or type(error) not in (ValueError, ImageLoadError, ImageNotFoundError):
                    raise
                raise type(error)(f"{'prompt' if use_prompt else 'conversations'}[{index}]: {error}") from None
        if force_batchify:
            return self.batchify(samples)
        return samples if is_list else samples[0]

    def batchify(self, sample_list: Sequence[VLChatProcessorOutput], padding: str = "left") -> BatchCollateOutput:
        """Pad samples to a batch: ids with pad_id, labels with ignore_id, tiles with zeros, crops with [0, 0]."""
        if not sample_list:
            raise ValueError("batchify needs at least one sample.")
        for sample in sample_list:
            if not isinstance(sample, VLChatProcessorOutput):
                raise ValueError(
                    f"batchify takes samples of process_one (or of processor(..., force_batchify=False)), got a "
                    f"{type(sample).__name__}; a processor(...) call already returns a batch."
                )
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}.")
        batch_size = len(sample_list)
        seq_lens = [len(sample) for sample in sample_list]
        max_len = max(seq_lens)
        input_ids = torch.full((batch_size, max_len), self.pad_id, dtype=torch.long)
        labels = torch.full((batch_size, max_len), self.ignore_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, max_len, dtype=torch.bool)
        images_seq_mask = torch.zeros(batch_size, max_len, dtype=torch.bool)
        max_tiles = max(sample.images.shape[0] for sample in sample_list)
        max_images = max(sample.images_spatial_crop.shape[0] for sample in sample_list)
        images = sample_list[0].images.new_zeros(batch_size, max_tiles, *sample_list[0].images.shape[1:])
        crops = torch.zeros(batch_size, max_images, 2, dtype=torch.long)
        for row, (sample, length) in enumerate(zip(sample_list, seq_lens)):
            span = slice(max_len - length, max_len) if padding == "left" else slice(0, length)
            input_ids[row, span] = sample.input_ids
            labels[row, span] = sample.target_ids
            attention_mask[row, span] = True
            images_seq_mask[row, span] = sample.images_seq_mask
            images[row, : sample.images.shape[0]] = sample.images
            crops[row, : sample.images_spatial_crop.shape[0]] = sample.images_spatial_crop
        labels[labels == self.pad_id] = self.ignore_id  # as the official batchify: a literal pad token is no target
        return BatchCollateOutput(
            sft_format=[sample.sft_format for sample in sample_list],
            input_ids=input_ids,
            labels=labels,
            attention_mask=attention_mask,
            images_seq_mask=images_seq_mask,
            images=images,
            images_spatial_crop=crops,
            seq_lens=seq_lens,
        )


# AutoProcessor.from_pretrained finds the class by the "processor_class" name in processor_config.json.
AutoProcessor.register(DeepseekVLV2Config, DeepseekVLV2Processor, exist_ok=True)


def _restore_special_token_flags(tokenizer: Any, tokenizer_config: Path) -> None:
    """transformers 5 loads the released `LlamaTokenizer` config as a plain tokenizers backend and drops its
    `add_bos_token: true`; restore it so `tokenizer(text)` prepends bos as the official tokenizer does."""
    if tokenizer_config.is_file():
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        for flag in ("add_bos_token", "add_eos_token"):
            if flag in settings:
                setattr(tokenizer, flag, settings[flag])


def _short_repr(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def _check_unicode(text: str) -> None:
    """The tokenizer fails with a TypeError on lone surrogates (e.g. from JSON "\\ud800"); say what is wrong."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"The text contains {text[error.start]!r} at character {error.start}, a lone surrogate that is not valid "
            "Unicode; remove it or decode the text with errors='replace'."
        ) from None


def _check_images(images: Any) -> None:
    if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
        raise ValueError(
            f"images must be a list of PIL images, got {type(images).__name__}; wrap a single image: [image]."
        )
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"images[{index}] is a {type(image).__module__}.{type(image).__name__}, not a PIL image; convert it "
                "with deepseek_vl.utils.io.load_image(...) (accepts paths, URLs, numpy arrays)."
            )


def _split_images(images: Any, num_items: int) -> list[Any]:
    """Per-item image lists for a batch call: None for all, or one list per item (a flat list if there is one item)."""
    if images is None:
        return [None] * num_items
    if isinstance(images, (list, tuple)) and images and all(isinstance(entry, (list, tuple)) for entry in images):
        if len(images) != num_items:
            raise ValueError(
                f"Got {num_items} prompts/conversations but {len(images)} image lists; pass one list per item."
            )
        return list(images)
    if num_items == 1:
        return [images]
    raise ValueError(
        f"For {num_items} prompts/conversations pass images as a list of {num_items} lists of PIL images "
        "(one per item, [] for none), or images=None to load each conversation's 'images' entries."
    )


def _warn_unused(kwargs: dict[str, Any]) -> None:
    if kwargs:
        warnings.warn(f"DeepseekVLV2Processor ignores unknown arguments: {sorted(kwargs)}", stacklevel=3)
