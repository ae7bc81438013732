"""DeepSeek-VL2 model, configuration and processor, under the names of the official package."""

from .configuration import (
    DeepseekV2Config,
    DeepseekVLV2Config,
    DeepseekVLV2ProjectorConfig,
    DeepseekVLV2VisionConfig,
)
from .modeling import DeepseekVLV2ForCausalLM, DeepseekVLV2PreTrainedModel
from .processing import BatchCollateOutput, DeepseekVLV2Processor

__all__ = [
    "BatchCollateOutput",
    "DeepseekV2Config",
    "DeepseekVLV2Config",
    "DeepseekVLV2ForCausalLM",
    "DeepseekVLV2PreTrainedModel",
    "DeepseekVLV2Processor",
    "DeepseekVLV2ProjectorConfig",
    "DeepseekVLV2VisionConfig",
]
