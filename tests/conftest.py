from __future__ import annotations

import signal

import pytest
import torch

from golden import GOLDEN, checkpoint

if not (GOLDEN / "checkpoints").is_dir():
    pytest.exit(f"golden data not found at {GOLDEN}: set DEEPSEEK_VL_GOLDEN to the shared/golden folder", returncode=4)

torch.set_num_threads(min(torch.get_num_threads(), 2))

# A suite started in the background (`pytest &`) inherits an ignored SIGINT, and so would every command it starts:
# the Ctrl-C tests need it delivered as in a terminal (a Python handler here becomes the default in the children).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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


@pytest.fixture(scope="module")
def pipe_for(load_model):
    """VLChat over the shared golden model of a variant, one per test module (modules may change its settings)."""
    from deepseek_vl.chat import VLChat
    from deepseek_vl.models import DeepseekVLV2Processor

    pipes: dict = {}

    def get(variant: str):
        if variant not in pipes:
            pipes[variant] = VLChat(load_model(variant), DeepseekVLV2Processor.from_pretrained(checkpoint(variant)))
        return pipes[variant]

    return get


@pytest.fixture(scope="module")
def tiny(pipe_for):
    return pipe_for("tiny")
