"""DeepSeek-VL2 for current transformers and torch.

The package imports nothing heavy: the model classes load on first use (`deepseek_vl.DeepseekVLV2ForCausalLM`,
`from deepseek_vl.models import ...`), which also registers them with transformers' Auto classes, since the
official checkpoints' config.json names `model_type: deepseek_vl_v2` and no architectures. So that
`import deepseek_vl` followed by `AutoModelForCausalLM.from_pretrained(...)` works too, the registration also
runs as soon as transformers is imported (at once if it already is).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

__all__ = ["DeepseekVLV2Config", "DeepseekVLV2ForCausalLM", "DeepseekVLV2Processor"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("deepseek_vl.models"), name)
    raise AttributeError(f"module 'deepseek_vl' has no attribute {name!r}")


def _register_models() -> None:
    if "deepseek_vl.models" not in sys.modules:  # when it is, its import is under way and registers at its end
        importlib.import_module("deepseek_vl.models")


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Registers the model with the Auto classes right after `import transformers`, wherever that happens."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                load(module)
                _register_models()

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


# Third-party notices on stderr that no user of this package can act on, by logger and message start:
# - transformers imports torchao when it is installed, and torchao's import makes torch log two deprecations;
# - peft imports bitsandbytes, whose import on an AVX512-BF16 CPU says it could not download an optional kernel
#   from the Hugging Face Hub (its own CPU kernels run; nothing here needs that one, see the README).
_QUIET_NOTICES = {
    "torch.utils._pytree": "<enum '",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


def _quiet(logger: str, start: str) -> None:
    logging.getLogger(logger).addFilter(lambda record: not record.getMessage().startswith(start))


for _logger, _start in _QUIET_NOTICES.items():
    _quiet(_logger, _start)

if "transformers" in sys.modules:
    _register_models()
else:
    sys.meta_path.insert(0, _AfterTransformersImport())
