from __future__ import annotations

import pytest
import torch

from golden import GOLDEN, checkpoint

if not (GOLDEN / "checkpoints").is_dir():
    pytest.exit(f"golden data not found at {GOLDEN}: set DEEPSEEK_VL_GOLDEN to the shared/golden folder", returncode=4)

torch.set_num_threads(min(torch.get_num_threads(), 2))

_models: dict = {}


@pytest.fixture(scope="session")
def load_model():
    """Golden checkpoint loaded once per session, float32, eval mode."""
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    def load(variant: str, attn_implementation: str = "sdpa"):
        key = (variant, attn_implementation)
        if key not in _models:
            _models[key] = DeepseekVLV2ForCausalLM.from_pretrained(
                checkpoint(variant), dtype=torch.float32, attn_implementation=attn_implementation
            ).eval()
        return _models[key]

    return load
