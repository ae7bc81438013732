"""`deepseek-vl2 batch`: answer a JSONL file of requests, several at a time, resumably.

Each answer is appended to OUTPUT as soon as its batch finishes, so a killed run loses at most one batch. A rerun
matches the records already in OUTPUT to the input lines by `id` (or, for a line without one, by a hash of its
request), so lines may be fixed, inserted or reordered between runs without losing answers. At the end OUTPUT is
rewritten in input order, one record per line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepseek_vl.serve.cli import (
    GENERATION_KEYS,
    CLIError,
    add_generation_arguments,
    add_model_arguments,
    generation_options,
    load_chat,
    positive_int,
)

if TYPE_CHECKING:
    from deepseek_vl.chat import VLChat

__all__ = ["LINE_OPTIONS", "Request", "add_parser", "read_requests", "run"]

DESCRIPTION = """\
Answer a JSONL file of requests, several at a time (one batched forward per token), appending one JSON record
per request to OUTPUT. Re-running with the same OUTPUT answers only what is missing: records are matched to input
lines by "id" (by a hash of the request for lines without one), so an interrupted run resumes, and a line that
was fixed or inserted is answered without redoing the others. Lines that failed are retried with --retry-errors.
When the run ends OUTPUT is rewritten in input order. The exit status is 1 if any line has an error.

Input lines:
  {"id": "q1", "messages": [{"role": "user", "content": "What is shown?", "images": ["cat.jpg"]}]}
  {"id": "q2", "prompt": "<|ref|>the cat<|/ref|>.", "images": ["cat.jpg"], "max_new_tokens": 64}
"messages" (user/assistant/system turns) or "prompt" (one user message) is required; "id" is optional but must
be unique. "images" is a flat list for the <image> tags, or, without tags, for the last user message; relative
image paths are relative to the folder of INPUT. Optional per line (the command-line values are the defaults):
  %s

Output records:
  {"id": "q1", "line": 1, "text": ..., "boxes": [...], "prompt_tokens": ..., "completion_tokens": ...,
   "finish_reason": "stop" | "length", "request_sha256": ...}
  {"id": "q3", "line": 3, "error": "...", "request_sha256": ...}   a line that could not be answered; the rest go on.
"""
LINE_OPTIONS = (*GENERATION_KEYS, "system_prompt")
_REQUEST_KEYS = {"id", "messages", "prompt", "images", *LINE_OPTIONS}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of requests in batches; resumable",
        description=DESCRIPTION % ", ".join(LINE_OPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="JSONL file of requests, one JSON object per line")
    parser.add_argument("output", metavar="OUTPUT", help="JSONL file of answers (created, or resumed if it exists)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N",
        help="requests generated together (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--retry-errors", action="store_true",
        help="answer again the lines whose record in OUTPUT is an error (e.g. after fixing a missing image)",
    )  # fmt: skip
    scale = parser.add_argument_group("scale-out (see README: Scale-out and evaluation)")
    scale.add_argument(
        "--shard", type=_shard, metavar="I/N",
        help="answer only shard I of N (0 <= I < N: every N-th request from the I-th) into OUTPUT.shard-I-of-N; "
        "e.g. --shard $SLURM_ARRAY_TASK_ID/8",
    )  # fmt: skip
    scale.add_argument(
        "--merge", type=positive_int, metavar="N",
        help="combine the N shard outputs of OUTPUT into OUTPUT, in input order; loads no model",
    )  # fmt: skip
    scale.add_argument(
        "--ray", action="store_true", help="answer on a Ray cluster, one model per actor (the [distributed] extra)"
    )
    scale.add_argument("--ray-address", metavar="ADDR", help="an existing Ray cluster (default: RAY_ADDRESS or local)")
    scale.add_argument(
        "--concurrency", type=positive_int, default=1, metavar="N", help="Ray actors, each with its model (default: 1)"
    )
    scale.add_argument("--num-gpus", type=float, default=0, metavar="G", help="GPUs per Ray actor (default: 0)")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.set_defaults(handler=run)


def _shard(text: str) -> tuple[int, int]:
    from deepseek_vl.distributed import parse_shard

    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


class Request:
    """One input line: its conversation and options, the key its answer is found by, or why it cannot be answered."""

    def __init__(self, line: int, text: str, base: Path, defaults: dict[str, Any]) -> None:
        self.line, self.id, self.error = line, None, None
        self.messages: list[dict[str, Any]] = []
        self.images: list | None = None
        self.options: dict[str, Any] = {}
        self.sha256 = hashlib.sha256(text.strip().encode()).hexdigest()
        try:
            self._parse(text, base, defaults)
        except ValueError as error:
            self.error = str(error)

    @property
    def key(self) -> str:
        return f"id:{json.dumps(self.id)}" if self.id is not None else f"sha256:{self.sha256}"

    def _parse(self, text: str, base: Path, defaults: dict[str, Any]) -> None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON: {error.msg} at column {error.colno}") from error
        if not isinstance(data, dict):
            raise ValueError("a request must be a JSON object")
        self.id = data.get("id")
        # whitespace and key order do not change what is asked: hash the request as parsed
        self.sha256 = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        if unknown := sorted(set(data) - _REQUEST_KEYS):
            raise ValueError(f"unknown keys {unknown}; allowed: {sorted(_REQUEST_KEYS)}")
        if ("messages" in data) == ("prompt" in data):
            raise ValueError('give either "messages" (a list of turns) or "prompt" (a string)')
        if "prompt" in data and not isinstance(data["prompt"], str):
            raise ValueError('"prompt" must be a string')
        messages = data.get("messages", [{"role": "user", "content": data.get("prompt")}])
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
        self.messages = [m | {"images": _relative_to(m["images"], base)} if "images" in m else m for m in messages]
        self.images = _relative_to(data["images"], base) if "images" in data else None
        self.options = defaults | {key: data[key] for key in LINE_OPTIONS if key in data}
        from deepseek_vl.options import GenerationOptions

        GenerationOptions(**{key: value for key, value in self.options.items() if key in GENERATION_KEYS})

    def group_key(self) -> str:
        return json.dumps(self.options, sort_keys=True)


def _relative_to(sources: Any, base: Path) -> Any:
    """Relative image paths of a request file are relative to that file, wherever the command runs."""
    if not isinstance(sources, list):
        raise ValueError('"images" must be a list')
    from deepseek_vl.distributed import relative_path

    return [str(base / s) if isinstance(s, str) and ":" not in s and relative_path(s) else s for s in sources]


def read_requests(source: Path, defaults: dict[str, Any]) -> list[Request]:
    """The non-blank lines of a JSONL file. Lines end at "\\n" only: JSON strings may hold U+2028 and friends."""
    if source.suffix == ".parquet":
        from deepseek_vl.distributed import parquet_lines

        lines = parquet_lines(source)
    else:
        text = source.read_bytes().decode("utf-8", errors="replace")
        lines = [line.removesuffix("\r") for line in text.split("\n")]
    requests = [Request(n, line, source.resolve().parent, defaults) for n, line in enumerate(lines, 1) if line.strip()]
    seen: dict[str, int] = {}
    for request in requests:
        if request.id is not None and request.key in seen:
            raise CLIError(
                f"lines {seen[request.key]} and {request.line} of {source} have the same id {request.id!r}; "
                "ids must be unique (answers are matched to lines by id)"
            )
        seen[request.key] = request.line
    hashed: dict[str, int] = {}  # identical lines without an id: the k-th copy gets the k-th answer
    for request in requests:
        if request.id is None:
            hashed[request.sha256] = count = hashed.get(request.sha256, 0) + 1
            request.sha256 += f"#{count}" if count > 1 else ""
    return requests


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise CLIError(f"input file {args.input!r} does not exist")
    if not target.resolve().parent.is_dir():
        raise CLIError(f"cannot write {args.output!r}: its folder does not exist")
    if target.exists() and target.resolve() == source.resolve():
        raise CLIError("OUTPUT must be a different file from INPUT")
    defaults = {key: value for key, value in generation_options(args).items() if key in LINE_OPTIONS}
    requests = read_requests(source, defaults)
    if args.merge:
        return _merge(target, requests, args.merge)
    if args.shard:
        requests, target = requests[args.shard[0] :: args.shard[1]], _shard_path(target, *args.shard)
    records = _read_records(target)
    done = {_record_key(record): record for record in records}
    todo = [r for r in requests if r.key not in done or (args.retry_errors and "error" in done[r.key])]
    # Errors kept from an earlier run (with --retry-errors they are in todo instead).
    earlier_errors = 0 if args.retry_errors else sum("error" in done[r.key] for r in requests if r.key in done)
    if args.ray:
        answered = _answer_on_ray(todo, args)
    else:
        pipe = load_chat(args) if any(request.error is None for request in todo) else None
        answered = _answer_with_engine(pipe, todo, args)
    errors = 0
    with (
        target.open("a", encoding="utf-8") as out,
        tqdm(
            total=len(requests), initial=len(requests) - len(todo), desc="answering", unit="line", file=sys.stderr
        ) as bar,
    ):
        for request, outcome in answered:
            record: dict[str, Any] = {"id": request.id, "line": request.line}
            if isinstance(outcome, str):
                record["error"] = outcome
                errors += 1
                bar.write(f"line {request.line}: {outcome}", file=sys.stderr)
            else:
                record |= outcome if isinstance(outcome, dict) else outcome.to_dict()
            record["request_sha256"] = request.sha256
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            records.append(record)
            bar.update(1)
    _rewrite_in_input_order(target, requests, records)
    summary = f"{len(todo)} lines answered ({errors} errors), {len(requests) - len(todo)} already done: {target}"
    if earlier_errors:
        summary += f"; {earlier_errors} lines failed in an earlier run: pass --retry-errors to retry them"
    print(summary, file=sys.stderr)
    return 1 if errors or earlier_errors else 0


def _answer_with_engine(pipe: VLChat | None, todo: list[Request], args: argparse.Namespace) -> Iterator[tuple]:
    """(request, ChatResult or error message) in line order, generated continuously: at most --batch-size lines
    decode together and a finished line's row goes to the next line at once (`deepseek_vl.engine`)."""
    import collections

    from deepseek_vl.engine import Engine

    engine = Engine(pipe, max_rows=args.batch_size) if pipe is not None else None
    if engine is not None:
        engine.start()
    pending: collections.deque = collections.deque()  # (request, handle or error), line order

    def finished(request: Request, outcome: Any) -> tuple:
        if isinstance(outcome, str):
            return request, outcome
        try:
            return request, outcome.wait()
        except Exception as error:  # noqa: BLE001 - any failure of one line (bad content, out of memory) is recorded
            return request, f"{type(error).__name__}: {error}"

    try:
        for request in todo:
            outcome: Any = request.error
            if outcome is None:
                try:
                    outcome = engine.submit(
                        request.messages, images=request.images, exif_transpose=args.exif_transpose, **request.options
                    )
                except Exception as error:  # noqa: BLE001
                    outcome = f"{type(error).__name__}: {error}"
            pending.append((request, outcome))
            while len(pending) > 2 * args.batch_size:  # images of lines ahead are loaded, not of the whole file
                yield finished(*pending.popleft())
        while pending:
            yield finished(*pending.popleft())
    finally:
        if engine is not None:
            engine.stop()


def _answer_on_ray(todo: list[Request], args: argparse.Namespace) -> Iterator[tuple[Request, Any]]:
    """(request, answer dict or error message) as Ray actors (VLPredictor) finish them, in input order."""
    from deepseek_vl.distributed import run_ray_batch

    for request in todo:
        if request.error is not None:
            yield request, request.error
    by_line = {request.line: request for request in todo}
    rows = [(r.line, {"messages": r.messages, "images": r.images, **r.options}) for r in todo if r.error is None]
    if not rows:
        return
    loading = {key: getattr(args, key, None) for key in ("quantize", "adapter") if getattr(args, key, None)}
    predictor = {"model": args.model, "device": args.device, "dtype": args.dtype, **loading}
    predictor["exif_transpose"] = args.exif_transpose
    for record in run_ray_batch(rows, predictor, address=args.ray_address, concurrency=args.concurrency,
                                batch_size=args.batch_size, num_gpus=args.num_gpus):  # fmt: skip
        answer = {key: value for key, value in record.items() if key not in ("id", "line")}
        yield by_line[record["line"]], answer.get("error", answer)


def _shard_path(target: Path, index: int, count: int) -> Path:
    from deepseek_vl.distributed import shard_path

    return shard_path(target, index, count)


def _merge(target: Path, requests: list[Request], count: int) -> int:
    """OUTPUT from the shard outputs, in input order; exit 1 if a shard is missing, a line unanswered or failed."""
    paths = [_shard_path(target, index, count) for index in range(count)]
    if missing := [str(path) for path in paths if not path.is_file()]:
        raise CLIError(f"missing shard outputs {missing}: run every --shard I/{count} first")
    records = [record for path in paths for record in _read_records(path)]
    _rewrite_in_input_order(target, requests, records)
    answered = {_record_key(record): record for record in records}
    unanswered = [r.line for r in requests if r.key not in answered]
    failed = [r.line for r in requests if "error" in answered.get(r.key, {})]
    summary = f"merged {count} shards: {len(requests) - len(unanswered)} of {len(requests)} lines answered"
    print(f"{summary} ({len(failed)} errors; unanswered lines: {unanswered[:10]}): {target}", file=sys.stderr)
    return 1 if unanswered or failed else 0


def _read_records(target: Path) -> list[dict[str, Any]]:
    """The records already in OUTPUT; a last line cut off mid-write is removed first."""
    if not target.exists():
        return []
    data = target.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with target.open("r+b") as file:
            file.truncate(len(complete))
    records = []
    for raw in complete.split(b"\n"):
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _record_key(record: dict[str, Any]) -> str | None:
    if record.get("id") is not None:
        return f"id:{json.dumps(record['id'])}"
    return f"sha256:{record['request_sha256']}" if isinstance(record.get("request_sha256"), str) else None


def _rewrite_in_input_order(target: Path, requests: Sequence[Request], records: list[dict[str, Any]]) -> None:
    """One record per input line, in input order (the newest for each); answers to lines no longer in the input
    are kept at the end (their errors are dropped). Written to a new file then renamed, so a crash leaves the old
    OUTPUT intact."""
    latest = {_record_key(record): record for record in records if _record_key(record) is not None}
    ordered = [latest[r.key] | {"line": r.line} for r in requests if r.key in latest]
    current = {r.key for r in requests}
    stale = []
    for record in records:
        key = _record_key(record)
        if "error" not in record and key not in current and (key is None or latest[key] is record):
            stale.append(record)
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for record in ordered + stale:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, target)
