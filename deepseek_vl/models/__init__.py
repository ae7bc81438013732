"""DeepSeek-VL2 model, configuration and processor, under the names of the official package."""

from transformers import AutoConfig, AutoModelForCausalLM

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

# The official config.json names `model_type: deepseek_vl_v2` and no architectures: register it with the Auto classes.
AutoConfig.register(DeepseekVLV2Config.model_type, DeepseekVLV2Config, exist_ok=True)
AutoModelForCausalLM.register(DeepseekVLV2Config, DeepseekVLV2ForCausalLM, exist_ok=True)
