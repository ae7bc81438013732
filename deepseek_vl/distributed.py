"""DeepSeek-VL2 on a cluster: a picklable predictor for Ray Data `map_batches`, and `batch --ray` on top of it.

    import ray
    from deepseek_vl.distributed import VLPredictor

    ds = ray.data.read_parquet("s3://bucket/questions.parquet")      # columns: prompt (or messages), images, ...
    answers = ds.map_batches(
        VLPredictor, fn_constructor_kwargs={"model": "deepseek-ai/deepseek-vl2-tiny", "max_new_tokens": 64},
        compute=ray.data.ActorPoolStrategy(size=4), num_gpus=1, batch_size=8,  # older Ray: concurrency=4
    )

Each actor loads the model once in `__init__`; `__call__` answers a batch of rows with `VLChat.chat_batch` (so the
greedy answers are the local `deepseek-vl2 batch` answers; seeded sampled rows are answered one by one, as
`chat(seed=...)` answers them) and a row that fails gets an `error` instead of stopping the job. Importing this module is light (the `batch` command's parser uses it); torch, the model and
Ray (the `distributed` extra) load when a predictor is built or `run_ray_batch` runs.
"""

from __future__ import annotations

import base64
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepseek_vl.options import GenerationOptions, ModelLoadError

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, VLChat

__all__ = [
    "RESULT_COLUMNS", "ROW_OPTIONS", "Row", "VLPredictor", "answer", "parquet_lines", "parse_shard", "run_ray_batch",
    "shard_path",
]  # fmt: skip

GENERATION_KEYS = tuple(f.name for f in GenerationOptions.__dataclass_fields__.values())
ROW_OPTIONS = (*GENERATION_KEYS, "system_prompt")
RESULT_COLUMNS = ("text", "boxes", "prompt_tokens", "completion_tokens", "finish_reason", "error")
ROW_KEYS = {"id", "line", "prompt", "messages", "images", "options", *ROW_OPTIONS}
_INTEGER_OPTIONS = ("max_new_tokens", "seed", "chunk_size")


class Row:
    """One request: its conversation, images and options, or why it cannot be answered (`error`)."""

    def __init__(self, data: dict[str, Any], defaults: dict[str, Any], base: Path | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.images: list | None = None
        self.options: dict[str, Any] = {}
        self.error: str | None = None
        try:
            self._parse(data, defaults, base)
        except ValueError as error:
            self.error = str(error)

    def _parse(self, data: dict[str, Any], defaults: dict[str, Any], base: Path | None) -> None:
        data = {key: value for key, value in data.items() if value is not None}
        if unknown := sorted(set(data) - ROW_KEYS):
            raise ValueError(f"unknown keys {unknown}; allowed: {sorted(ROW_KEYS)}")
        if ("messages" in data) == ("prompt" in data):
            raise ValueError('give either "messages" (a list of turns) or "prompt" (a string)')
        if "prompt" in data and not isinstance(data["prompt"], str):
            raise ValueError('"prompt" must be a string')
        messages = _json_field(data, "messages", [{"role": "user", "content": data.get("prompt")}])
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
        messages = [_present(m) for m in messages]
        self.messages = [m | {"images": _resolve(m["images"], base)} if "images" in m else m for m in messages]
        self.images = _resolve(_json_field(data, "images", None), base)
        row_options = _json_field(data, "options", {})
        if not isinstance(row_options, dict) or (unknown := sorted(set(_present(row_options)) - set(ROW_OPTIONS))):
            raise ValueError(f'"options" must be an object with keys among {list(ROW_OPTIONS)}')
        row_options = _present(row_options)
        given = row_options | {key: data[key] for key in ROW_OPTIONS if key in data}
        self.options = defaults | {key: _integral(key, _python(value)) for key, value in given.items()}
        GenerationOptions(**{key: value for key, value in self.options.items() if key in GENERATION_KEYS})

    def group_key(self) -> str:
        """Rows with equal keys share a batched generation. A seeded sampled row is alone: a batch draws all its rows
        from one generator, and the seed promises the answer `chat(seed=...)` (and `deepseek-vl2 batch`) gives."""
        key = json.dumps(self.options, sort_keys=True)
        return f"{key}#{id(self)}" if self.options.get("temperature") and self.options.get("seed") is not None else key


def _present(value: dict[str, Any]) -> dict[str, Any]:
    """A struct cell without its null fields: Arrow gives every row all the fields any row of the column has."""
    return {key: item for key, item in value.items() if item is not None}


def _json_field(data: dict[str, Any], key: str, default: Any) -> Any:
    """A list or object column may hold a JSON string (convenient in Parquet and CSV)."""
    value = data.get(key, default)
    if isinstance(value, str) and key != "prompt":
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            if key == "images":  # most likely one path or URL
                raise ValueError(f'"images" must be a list (or its JSON text), got the string {value[:80]!r}: put '
                                 "the image in a list") from error  # fmt: skip
            raise ValueError(f'"{key}" is a string but not valid JSON: {error.msg}') from error
    return value


def _resolve(sources: Any, base: Path | None) -> list | None:
    """Relative image paths are relative to the request file, wherever the job runs."""
    if sources is None:
        return None
    if not isinstance(sources, list):
        raise ValueError(f'"images" must be a list, got {type(sources).__name__}')
    if base is None:
        return sources
    return [
        str(base / s) if isinstance(s, str) and ":" not in s and relative_path(s) else s
        for s in sources
    ]


def relative_path(source: str) -> bool:
    """Whether an image path is relative (so resolved from the request file's folder); "~nouser/x.png" is left to
    load_image, which makes it that row's error instead of a RuntimeError for the whole batch."""
    try:
        return not Path(source).expanduser().is_absolute()
    except RuntimeError:
        return False


def _integral(key: str, value: Any) -> Any:
    """An integer option read from a float column (Arrow turns an int column with nulls into floats) as an int."""
    if key in _INTEGER_OPTIONS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _python(value: Any) -> Any:
    """Arrow/numpy cells as plain Python: arrays become lists, numpy scalars numbers, NaN (a null int) None."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_python(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _python(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_python(v) for v in value]
    return value


def result_types() -> dict[str, Any]:
    """The Arrow type of each result column (`ChatResult.to_dict()`, and `error`)."""
    import pyarrow as pa

    box = pa.struct([
        ("label", pa.string()), ("box", pa.list_(pa.int64())), ("pixels", pa.list_(pa.float64())),
        ("image_index", pa.int64()),
    ])  # fmt: skip
    return {
        "text": pa.string(), "boxes": pa.list_(box), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64(),
        "finish_reason": pa.string(), "error": pa.string(),
    }  # fmt: skip


def _check_columns(names: list[str]) -> None:
    """Column mistakes that would silently lose data or images, refused before any row is answered."""
    if clash := sorted(set(names) & set(RESULT_COLUMNS)):
        raise ValueError(
            f"the dataset has columns {clash}, which VLPredictor writes its answers to; rename them first "
            "(Dataset.rename_columns)"
        )
    if "image" in names and "images" not in names:
        raise ValueError(
            'VLPredictor reads images from the column "images" (a list of images per row), not "image": '
            'rename it and put each image in a list, e.g. ds.map(lambda row: {**row, "images": [row.pop("image")]})'
        )


def _rows(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The rows of a dict of columns (numpy arrays, lists or a pandas DataFrame's columns)."""
    columns = {key: list(values) for key, values in batch.items()}
    size = len(next(iter(columns.values()), []))
    for index in range(size):
        yield {key: _python(values[index]) for key, values in columns.items()}


class VLPredictor:
    """Answers batches of rows; built once per Ray actor (or process), so the model loads once.

    Constructor: the model (folder or Hub id), `device`, `dtype`, `quantize` and `adapter` (as
    `VLChat.from_pretrained`), `base_dir` for relative image paths, `max_image_pixels` (default: VLChat's), and
    default generation options (`max_new_tokens=`, `temperature=`, ..., `system_prompt=`).

    Columns read: `prompt` (a string) or `messages` (a list of turns, or its JSON text); `images` (paths, URLs,
    data URLs or raw bytes, for the `<image>` tags in order, or without tags for the last user message); optional
    per-row options (`max_new_tokens`, `temperature`, ..., `system_prompt`, or an `options` object); any other
    column (`id`, ...) is passed through (with `batch_format="pyarrow"` exactly as read: Ray's default numpy batches
    turn a list column with nulls into pickled objects). Columns added, with the Arrow types of `result_types()`:
    `text`, `boxes` (list of {label, box, pixels, image_index}), `prompt_tokens`, `completion_tokens`,
    `finish_reason`, `error` (None when answered).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        adapter: str | None = None,
        base_dir: str | None = None,
        exif_transpose: bool = False,
        max_image_pixels: int | None = None,
        **generation: Any,
    ) -> None:
        self._arguments = {"model": model, "device": device, "dtype": dtype, "quantize": quantize, "adapter": adapter,
                           "base_dir": base_dir, "exif_transpose": exif_transpose,
                           "max_image_pixels": max_image_pixels} | generation  # fmt: skip
        if unknown := sorted(set(generation) - set(ROW_OPTIONS)):
            raise ValueError(f"unknown generation options {unknown}; use {list(ROW_OPTIONS)}")
        GenerationOptions(**{key: value for key, value in generation.items() if key in GENERATION_KEYS})
        self.defaults = generation
        self.base = Path(base_dir) if base_dir is not None else None
        self.exif_transpose = exif_transpose
        from deepseek_vl.chat import VLChat

        self.pipe = VLChat.from_pretrained(
            model, device=device, dtype=dtype, progress=False, quantize=quantize, adapter=adapter
        )
        if max_image_pixels is not None:
            self.pipe.max_image_pixels = max_image_pixels

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its constructor arguments: the copy loads the model itself, where it is unpickled."""
        return self._arguments

    def __setstate__(self, arguments: dict[str, Any]) -> None:
        self.__init__(**arguments)

    def __call__(self, batch: Any) -> Any:
        """The batch (a dict of columns, a pandas DataFrame or a pyarrow Table, as `batch_format` gives it) with the
        result columns added as Arrow arrays of fixed types: a batch whose rows all failed (or found no box) has the
        schema of any other, so `write_parquet` writes one schema and the blocks concatenate."""
        import pyarrow as pa

        names = list(batch.column_names if isinstance(batch, pa.Table) else batch.keys())
        _check_columns(names)
        rows = batch.to_pylist() if isinstance(batch, pa.Table) else list(_rows(batch))
        records = self.answer_rows([{k: v for k, v in row.items() if k in ROW_KEYS} for row in rows])
        results = {
            column: pa.array([record.get(column) for record in records], type=kind)
            for column, kind in result_types().items()
        }
        if isinstance(batch, pa.Table):
            for column, values in results.items():
                batch = batch.append_column(column, values)
            return batch
        pandas = sys.modules.get("pandas")  # a DataFrame means pandas is loaded; plain dicts need no pandas
        if pandas is not None and isinstance(batch, pandas.DataFrame):
            return batch.assign(**{column: pandas.arrays.ArrowExtensionArray(v) for column, v in results.items()})
        return dict(batch) | results

    def answer_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One record per row: the `ChatResult.to_dict()` keys, or `{"error": message}`."""
        requests = [Row(row, self.defaults, self.base) for row in rows]
        return [
            {"error": outcome} if isinstance(outcome, str) else outcome.to_dict()
            for outcome in answer(self.pipe, requests, self.exif_transpose)
        ]


def answer(pipe: VLChat, requests: list[Row], exif_transpose: bool) -> list[ChatResult | str]:
    """A ChatResult or an error message per request, in order; requests with equal options share a batch."""
    outcomes: list[ChatResult | str | None] = [request.error for request in requests]
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
        if request.error is None:
            groups.setdefault(request.group_key(), []).append(index)
    for indices in groups.values():
        for index, outcome in zip(indices, _answer_group(pipe, [requests[i] for i in indices], exif_transpose)):
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


def _answer_group(pipe: VLChat, group: list[Row], exif_transpose: bool) -> list[ChatResult | str]:
    """One batched generation; if it fails, each request alone, so one bad row only fails itself."""
    try:
        return pipe.chat_batch(
            [request.messages for request in group],
            images=[request.images for request in group],
            exif_transpose=exif_transpose,
            **group[0].options,
        )
    except Exception as error:  # noqa: BLE001 - any failure of one row (bad content, out of memory) is recorded
        if len(group) == 1:
            return [f"{type(error).__name__}: {error}"]
        return [outcome for request in group for outcome in _answer_group(pipe, [request], exif_transpose)]


def run_ray_batch(
    rows: list[tuple[int, dict[str, Any]]],
    predictor_kwargs: dict[str, Any],
    *,
    address: str | None = None,
    concurrency: int = 1,
    batch_size: int = 8,
    num_gpus: float = 0,
) -> Iterator[dict[str, Any]]:
    """Answer `rows` ((line number, request) pairs) on a Ray cluster; yields one record per row, in input order.

    Rows are plain JSON-able dicts; lists and objects travel as JSON text so that Arrow never has to unify
    the shapes of different rows. `address` None starts (or joins, via RAY_ADDRESS) a local cluster.
    """
    model = str(predictor_kwargs.get("model", ""))
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():  # caught here, not in each actor
        raise ModelLoadError(f"model folder {model!r} does not exist")
    for key in ("model", "adapter"):  # actors do not run in this process's folder: a relative path names another
        if predictor_kwargs.get(key) and Path(predictor_kwargs[key]).expanduser().is_dir():
            predictor_kwargs = predictor_kwargs | {key: str(Path(predictor_kwargs[key]).expanduser().resolve())}
    try:
        import ray
    except ImportError as error:
        raise ModelLoadError('Ray is not installed: pip install "deepseek-vl2[distributed]"') from error
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    encoded = [
        {"line": line, "id": json.dumps(row.get("id")), "request": json.dumps(row, ensure_ascii=False)}
        for line, row in rows
    ]
    dataset = ray.data.from_items(encoded, override_num_blocks=max(1, math.ceil(len(encoded) / batch_size)))
    answered = dataset.map_batches(
        _RequestPredictor,
        fn_constructor_kwargs=predictor_kwargs,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        num_gpus=num_gpus,
    )
    try:
        for record in answered.iter_rows():
            yield {"id": json.loads(record["id"]), "line": int(record["line"])} | json.loads(record["answer"])
    except ray.exceptions.RayActorError as error:
        if not error.actor_init_failed:
            raise
        cause = str(error).strip().splitlines()[-1]  # the actor's exception, after its traceback
        raise ModelLoadError(f"the Ray actors could not load the model {model!r}: {cause}") from error


class _RequestPredictor(VLPredictor):
    """VLPredictor over rows holding the whole request as JSON text (`batch --ray`); answers go back as JSON."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        records = self.answer_rows([json.loads(text) for text in batch["request"]])
        answers = [json.dumps(record, ensure_ascii=False) for record in records]
        return {"line": list(batch["line"]), "id": list(batch["id"]), "answer": answers}


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N): shard I of N, e.g. `--shard $SLURM_ARRAY_TASK_ID/8` with `--array=0-7`."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit() or not 0 <= int(index) < int(count):
        raise ValueError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(index), int(count)


def shard_path(output: Path, index: int, count: int) -> Path:
    """Where shard I of N writes: answers.jsonl -> answers.shard-I-of-N.jsonl, beside OUTPUT."""
    return output.with_name(f"{output.stem}.shard-{index}-of-{count}{output.suffix}")


def parquet_lines(source: Path) -> list[str]:
    """The rows of a Parquet file as JSONL request lines (null cells left out, image bytes as data URLs), so both
    inputs share one parser."""
    import pyarrow.parquet as pq

    return [json.dumps(_cell(row), default=_bytes_url) for row in pq.read_table(source).to_pylist()]


def _cell(value: Any, key: str = "") -> Any:
    """Null struct fields left out; a `messages` or `images` cell may be JSON text (one Arrow type for any shape)."""
    if key in ("messages", "images") and isinstance(value, str) and value.lstrip().startswith("["):
        return json.loads(value)
    if isinstance(value, dict):
        return {k: _cell(v, k) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_cell(v) for v in value]
    return value


def _bytes_url(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return "data:image/*;base64," + base64.b64encode(value).decode()
    raise TypeError(f"a {type(value).__name__} cell cannot be part of a request")
