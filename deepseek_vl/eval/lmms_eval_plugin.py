"""An lmms-eval model plugin (`pip install "deepseek-vl2[eval]"`): `lmms-eval --model deepseek_vl2 ...`.

lmms-eval finds it through the `lmms_eval.models` entry point of this package (`manifest`). A request's
arguments are (context, generation kwargs, doc_to_visual, doc id, task, split); the task's images go before the
context, one `<image>` each, unless the context places them with its own `<image>` tags. Requests that share
generation settings are answered together in batches of `batch_size`.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

__all__ = ["DeepseekVL2", "manifest"]


class DeepseekVL2(lmms):
    """model_args: pretrained=FOLDER_OR_HUB_ID, device=auto, dtype=auto, and generation defaults (max_new_tokens=...,
    temperature=..., ...). lmms-eval adds its `--batch_size` (default 1; so not in model_args too, which lmms-eval
    would pass twice), `--device` and `--max_batch_size` (for `--batch_size auto`, which this model does not take;
    ignored)."""

    def __init__(self, pretrained: str = "deepseek-ai/deepseek-vl2-tiny", device: str = "auto", dtype: str = "auto",
                 batch_size: int | str = 1, max_batch_size: int | None = None, **kwargs: Any) -> None:  # fmt: skip
        super().__init__()
        from deepseek_vl.chat import VLChat
        from deepseek_vl.distributed import GENERATION_KEYS, ROW_OPTIONS
        from deepseek_vl.options import GenerationOptions

        # checked before the model loads: a typo in model_args would otherwise fail at the first batch
        if unknown := sorted(set(kwargs) - set(ROW_OPTIONS)):
            raise ValueError(f"unknown model_args {unknown}; generation options are {list(ROW_OPTIONS)}")
        self.defaults = {key: _number(value) for key, value in kwargs.items()}
        GenerationOptions(**{key: value for key, value in self.defaults.items() if key in GENERATION_KEYS})
        self.batch_size = int(batch_size)
        self.pipe = VLChat.from_pretrained(pretrained, device=device, dtype=dtype, progress=False)

    def generate_until(self, requests: list[Any]) -> list[str]:
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            # every visual goes to the model (PIL images, paths, arrays); one it cannot read (a video, audio) fails
            # loudly instead of being dropped, which would score answers given without it
            visuals = [v for v in (visuals if isinstance(visuals, list) else [visuals]) if v is not None]
            options = self.defaults | _options(gen_kwargs or {})
            prepared.append(([{"role": "user", "content": context}], visuals, options))
            groups.setdefault(repr(sorted(options.items())), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                results = self.pipe.chat_batch(
                    [prepared[i][0] for i in chunk], images=[prepared[i][1] for i in chunk], **prepared[chunk[0]][2]
                )
                for i, result in zip(chunk, results):
                    answers[i] = result.text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]),
                                                result.text)  # fmt: skip
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("deepseek_vl2 answers generation tasks (generate_until) only")

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("deepseek_vl2 answers single-round generation tasks only")


def _options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lmms-eval's generation kwargs as VLChat options (sampling only when do_sample asks for it)."""
    options: dict[str, Any] = {}
    if "max_new_tokens" in gen_kwargs:
        options["max_new_tokens"] = int(gen_kwargs["max_new_tokens"])
    if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature"):
        options["temperature"] = float(gen_kwargs["temperature"])
        options["top_p"] = float(gen_kwargs.get("top_p") or 1.0)
    until = gen_kwargs.get("until")
    stops = [until] if isinstance(until, str) else list(until or [])
    if stops := [s for s in stops if s]:
        options["stop"] = stops
    return options


def _number(value: Any) -> Any:
    """model_args arrive as strings: "64" -> 64, "0.5" -> 0.5."""
    if isinstance(value, str):
        for convert in (int, float):
            try:
                return convert(value)
            except ValueError:
                pass
    return value


def manifest() -> Any:
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="deepseek_vl2", simple_class_path=f"{__name__}.DeepseekVL2")
