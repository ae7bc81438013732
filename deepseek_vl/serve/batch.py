"""`deepseek-vl2 batch`: answer a JSONL file of requests, several at a time, resumably.

Each answer is appended to OUTPUT as soon as its batch finishes, so a killed run loses at most one batch. A rerun
matches the records already in OUTPUT to the input lines by `id` (or, for a line without one, by a hash of its
request), by the request's hash and by a hash of the settings that decide its answer (model, adapter, quantization,
dtype, the options it is answered with), so lines may be fixed, edited, inserted or reordered between runs, and
settings changed, and only the lines concerned are answered again. At the end OUTPUT is rewritten in input order,
one record per line; answers that no longer match a line are moved to answers.stale.jsonl beside answers.jsonl,
not lost. A file that is not an OUTPUT of this command (INPUT given as OUTPUT, say) is never overwritten.
"""

from __future__ import annotations

import argparse
import codecs
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
was fixed, edited or inserted is answered without redoing the others; so is every line a change of --model,
--adapter, --quantize, --dtype, --exif-transpose or a generation option concerns (--device is not compared).
Lines that failed and are unchanged (say,
an image that was missing) are retried with --retry-errors. When the run ends OUTPUT holds one record per input
line, in input order; answers that no longer match a line (edited or removed) are moved to answers.stale.jsonl
for an OUTPUT answers.jsonl. OUTPUT must be new or an earlier OUTPUT: any other file is refused. INPUT is UTF-8.
The exit status is 1 if any line has an error.

Input lines:
  {"id": "q1", "messages": [{"role": "user", "content": "What is shown?", "images": ["cat.jpg"]}]}
  {"id": "q2", "prompt": "<|ref|>the cat<|/ref|>.", "images": ["cat.jpg"], "max_new_tokens": 64}
"messages" (user/assistant/system turns) or "prompt" (one user message) is required; "id" is optional but must
be unique. "images" is a flat list for the <image> tags, or, without tags, for the last user message; relative
image paths are relative to the folder of INPUT. Optional per line (the command-line values are the defaults):
  %s

Output records:
  {"id": "q1", "line": 1, "text": ..., "boxes": [...], "prompt_tokens": ..., "completion_tokens": ...,
   "finish_reason": "stop" | "length", "request_sha256": ..., "settings_sha256": ...}
  {"id": "q3", "line": 3, "error": "...", "request_sha256": ..., "settings_sha256": ...}   a line that could not be
  answered; the rest go on.
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
    shard_or_merge = scale.add_mutually_exclusive_group()  # shards are answered first, then merged by another run
    shard_or_merge.add_argument(
        "--shard", type=_shard, metavar="I/N",
        help="answer only shard I of N (0 <= I < N: every N-th request from the I-th) into OUTPUT.shard-I-of-N; "
        "e.g. --shard $SLURM_ARRAY_TASK_ID/8",
    )  # fmt: skip
    shard_or_merge.add_argument(
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

    def __init__(self, line: int, text: str, base: Path, defaults: dict[str, Any], problem: str | None = None) -> None:
        self.line, self.id, self.error = line, None, problem
        self.messages: list[dict[str, Any]] = []
        self.images: list | None = None
        self.options: dict[str, Any] = {}
        self.sha256 = hashlib.sha256(text.strip().encode()).hexdigest()
        self.settings_sha256 = ""  # set by the run, which knows the model
        if problem is not None:  # e.g. the line is not UTF-8
            return
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

        options = {key: value for key, value in self.options.items() if key in GENERATION_KEYS}
        try:
            GenerationOptions(**options)
        except TypeError as error:  # a type the options do not check themselves: still this line's error only
            raise ValueError(f"bad options {json.dumps(options)}: {error}") from error

    def group_key(self) -> str:
        return json.dumps(self.options, sort_keys=True)


def _relative_to(sources: Any, base: Path) -> Any:
    """Relative image paths of a request file are relative to that file, wherever the command runs."""
    if not isinstance(sources, list):
        raise ValueError('"images" must be a list')
    from deepseek_vl.distributed import relative_path

    return [str(base / s) if isinstance(s, str) and s and ":" not in s and relative_path(s) else s for s in sources]


def read_requests(source: Path, defaults: dict[str, Any]) -> list[Request]:
    """The non-blank lines of a JSONL file (UTF-8, with or without a BOM). Lines end at "\\n" only: JSON strings may
    hold U+2028 and friends."""
    if source.suffix == ".parquet":
        from deepseek_vl.distributed import parquet_lines

        lines: list[tuple[str, str | None]] = [(line, None) for line in parquet_lines(source)]
    else:
        data = source.read_bytes().removeprefix(codecs.BOM_UTF8)
        lines = [_decode(raw.removesuffix(b"\r")) for raw in data.split(b"\n")]
    base = source.resolve().parent
    requests = [Request(n, text, base, defaults, error) for n, (text, error) in enumerate(lines, 1) if text.strip()]
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


def _decode(raw: bytes) -> tuple[str, str | None]:
    """A line's text, and its error if it is not UTF-8: the line fails rather than asking with U+FFFD in the prompt."""
    try:
        return raw.decode(), None
    except UnicodeDecodeError as error:
        return raw.decode(errors="replace"), f"not UTF-8 (byte {error.start + 1} of the line): save INPUT as UTF-8"


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    source, target = Path(args.input), Path(args.output)
    if target.is_dir():  # before its name is used: "." has none
        raise CLIError(f"cannot write {args.output!r}: it is a directory; give OUTPUT as a file path")
    if args.shard:
        target = _shard_path(target, *args.shard)
    stale_path = target.with_name(f"{target.stem}.stale{target.suffix}")
    if not source.is_file():
        raise CLIError(f"input file {args.input!r} {_what_is(source)}: give a JSONL or Parquet file")
    for path in (target, stale_path):
        if path.exists() and not path.is_file():
            raise CLIError(f"cannot write {str(path)!r}: it {_what_is(path)}; give OUTPUT as a file path")
    if not target.resolve().parent.is_dir():
        raise CLIError(f"cannot write {str(target)!r}: its folder does not exist")
    if target.exists() and target.resolve() == source.resolve():
        raise CLIError("OUTPUT must be a different file from INPUT")
    records, intact = _read_records(target)  # before anything is written: refuses a file that is not an OUTPUT
    defaults = {key: value for key, value in generation_options(args).items() if key in LINE_OPTIONS}
    requests = read_requests(source, defaults)
    if args.merge:  # the shards' runs compared their settings; this one loads no model
        return _merge(target, requests, args.merge)
    for request in requests:
        request.settings_sha256 = _settings_sha256(args, request)
    if args.shard:
        requests = requests[args.shard[0] :: args.shard[1]]
    done = _answers(requests, records)
    todo = [r for r in requests if r.key not in done or (args.retry_errors and "error" in done[r.key])]
    # Errors kept from an earlier run (with --retry-errors they are in todo instead).
    earlier_errors = 0 if args.retry_errors else sum("error" in record for record in done.values())
    if args.ray:
        answered = _answer_on_ray(todo, args)
    else:
        pipe = load_chat(args) if any(request.error is None for request in todo) else None
        answered = _answer_with_engine(pipe, todo, args)
    errors = 0
    _end_records(target, intact)
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
            record["request_sha256"], record["settings_sha256"] = request.sha256, request.settings_sha256
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            records.append(record)
            bar.update(1)
    answers = _answers(requests, records)
    kept = {id(record) for record in answers.values()}
    if stale := [record for record in records if id(record) not in kept and "error" not in record]:
        with stale_path.open("a", encoding="utf-8") as out:  # before OUTPUT is rewritten without them
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in stale)
    _write_records(target, [answers[r.key] | {"line": r.line} for r in requests if r.key in answers])
    summary = f"{len(todo)} lines answered ({errors} errors), {len(requests) - len(todo)} already done: {target}"
    if stale:
        summary += f"; {len(stale)} answers to lines since edited or removed moved to {stale_path}"
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
    if args.max_image_pixels:  # the limit the local run sets (load_chat)
        predictor["max_image_pixels"] = args.max_image_pixels
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
    answered = _answers(requests, [record for path in paths for record in _read_records(path)[0]], settings=False)
    _write_records(target, [answered[r.key] | {"line": r.line} for r in requests if r.key in answered])
    unanswered = [r.line for r in requests if r.key not in answered]
    failed = [r.line for r in requests if "error" in answered.get(r.key, {})]
    summary = f"merged {count} shards: {len(requests) - len(unanswered)} of {len(requests)} lines answered"
    print(f"{summary} ({len(failed)} errors; unanswered lines: {unanswered[:10]}): {target}", file=sys.stderr)
    return 1 if unanswered or failed else 0


def _what_is(path: Path) -> str:
    return "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"


def _read_records(target: Path) -> tuple[list[dict[str, Any]], int]:
    """The records already in OUTPUT, and the length of OUTPUT without a last record cut off by a killed run. Any
    other content is refused, so that a file which is not this command's (INPUT given as OUTPUT) is never replaced."""
    if not target.exists():
        return [], 0
    data = target.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if _is_record(record):
            records.append(record)
        elif number == len(lines) and raw.startswith(b'{"id": '):  # the last line, without its "\n": cut off
            return records, len(data) - len(raw)
        else:
            raise CLIError(
                f"{str(target)!r} is not an OUTPUT of deepseek-vl2 batch (line {number} is not an answer record) and "
                "is left as it is: give a new OUTPUT file, or an earlier one to resume (INPUT comes first)"
            )
    return records, len(data)


def _is_record(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and "id" in value
        and isinstance(value.get("line"), int)
        and isinstance(value.get("request_sha256"), str)
        and ("text" in value or "error" in value)
    )


def _end_records(target: Path, intact: int) -> None:
    """Before appending to OUTPUT: remove a record cut off by a killed run, end a last record that lacks its "\\n"."""
    if not target.exists():
        return
    with target.open("r+b") as file:
        file.truncate(intact)
        if intact:
            file.seek(intact - 1)
            if file.read(1) != b"\n":
                file.write(b"\n")


def _answers(
    requests: Sequence[Request], records: list[dict[str, Any]], settings: bool = True
) -> dict[str, dict[str, Any]]:
    """The record that answers each request, by request key: the newest with its key and its request hash, and, with
    ``settings``, made with the request's settings (a record of an older version of this command has none, and
    counts as made with them). A record for an earlier version of the line (another hash) or made with other
    settings is stale: the line is answered again."""
    newest = {(_record_key(record), record["request_sha256"]): record for record in records}
    return {
        r.key: newest[r.key, r.sha256]
        for r in requests
        if (r.key, r.sha256) in newest
        and (not settings or newest[r.key, r.sha256].get("settings_sha256", r.settings_sha256) == r.settings_sha256)
    }


def _settings_sha256(args: argparse.Namespace, request: Request) -> str:
    """A hash of what decides a line's answer besides the line: the model as loaded and the options (the command
    line's, as the line's own override them). The device is left out: a run resumed on another machine goes on."""
    from deepseek_vl.options import model_reference

    settings = {
        "model": model_reference(args.model),
        "adapter": model_reference(args.adapter) if args.adapter else None,
        "quantize": args.quantize,
        "dtype": args.dtype,
        "exif_transpose": args.exif_transpose,
        "options": request.options,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _record_key(record: dict[str, Any]) -> str:
    return f"id:{json.dumps(record['id'])}" if record["id"] is not None else f"sha256:{record['request_sha256']}"


def _write_records(target: Path, records: list[dict[str, Any]]) -> None:
    """Written to a new file then renamed, so a crash leaves the old OUTPUT intact."""
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(partial, target)
