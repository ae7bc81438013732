"""DeepSeek-VL2 model, configuration and processor, under the names of the official package."""

import warnings

import PIL
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


def warn_if_old_pillow(version: str = PIL.__version__) -> None:
    """Pillow 12 and older resize some images (e.g. the golden 90x1500 one) one or two levels off Pillow 13's
    bicubic result, which is what the official tiles are; Gradio's `pillow<13` pin installs such a Pillow."""
    if int(version.split(".")[0]) < 13:
        warnings.warn(
            f"Pillow {version} tiles some images slightly differently from the official preprocessing (Pillow 13's "
            "bicubic resize): pip install 'pillow>=13' (Gradio declares pillow<13 but works with 13)",
            stacklevel=2,
        )


warn_if_old_pillow()
