"""Collator: conversations -> a right-padded training batch whose labels cover only the assistant turns.

The processor does the tokens (training mode: every turn, the final eos kept), so a row's ids are exactly the ids
inference builds for the same conversation up to each answer. This module only picks the labels and pads.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from deepseek_vl.models.processing import DeepseekVLV2Processor, VLChatProcessorOutput
from deepseek_vl.train.data import Example
from deepseek_vl.utils.io import load_image

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "images", "images_seq_mask", "images_spatial_crop")


class TooLongError(ValueError):
    pass


class Collator:
    """Callable on a list of Examples; returns the model's keyword arguments (labels included) as tensors.

    Labels: the assistant answers and their closing eos; the prompt, system message, image tokens and padding are
    -100. ``max_length`` refuses rows the model cannot take (the row's file and line are named).
    """

    def __init__(self, processor: DeepseekVLV2Processor, max_length: int | None = None) -> None:
        # mask_prompt makes the processor label user/system turns -100 (the released processor_config has it off).
        self.processor = processor if processor.mask_prompt else copy.copy(processor)
        self.processor.mask_prompt = True
        self.max_length = max_length

    def sample(self, example: Example) -> VLChatProcessorOutput:
        images = [load_image(path) for path in example.images]
        sample = self.processor.process_one(conversations=example.messages, images=images, inference_mode=False)
        if self.max_length is not None and len(sample) > self.max_length:
            raise TooLongError(
                f"{example.source}:{example.line}: the conversation is {len(sample)} tokens, over the limit of "
                f"{self.max_length} (--max-length); shorten it, use fewer or smaller images, or split it"
            )
        return sample

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        batch = self.processor.batchify([self.sample(example) for example in examples], padding="right")
        batch.labels[:, 0] = self.processor.ignore_id  # never a target (nothing precedes it); keeps counts exact
        return {key: batch[key] for key in MODEL_KEYS}


def num_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over (the next-token targets that are not -100)."""
    return int((batch["labels"][:, 1:] != -100).sum())
