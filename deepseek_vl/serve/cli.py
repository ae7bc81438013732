"""The `deepseek-vl2` command (also `python -m deepseek_vl`): generate, chat and batch with DeepSeek-VL2.

Sub-commands are listed in `SUBCOMMANDS` as "module:function"; the function receives the sub-parsers object,
adds its parser and sets `handler` (args -> exit code). Modules that are not present are skipped, so `serve`,
`demo` appear once their modules exist. They can reuse `add_model_arguments`,
`add_generation_arguments`, `generation_options` and `load_chat` from here.

User errors (bad paths, option values, a model that cannot be found) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from PIL import Image

from deepseek_vl.chat import (
    DEFAULT_MODEL,
    ChatResult,
    ChatStream,
    GenerationOptions,
    ModelLoadError,
    VLChat,
    resolve_device,
    resolve_dtype,
)
from deepseek_vl.grounding import draw_grounding
from deepseek_vl.utils.io import ImageLoadError, load_image

__all__ = [
    "SUBCOMMANDS", "CLIError", "add_generation_arguments", "add_model_arguments", "build_parser",
    "generation_options", "load_chat", "main",
]  # fmt: skip

SUBCOMMANDS: dict[str, str] = {
    "generate": "deepseek_vl.serve.cli:add_generate_parser",
    "chat": "deepseek_vl.serve.cli:add_chat_parser",
    "batch": "deepseek_vl.serve.cli:add_batch_parser",
    "serve": "deepseek_vl.serve.server:add_parser",
    "demo": "deepseek_vl.serve.demo:add_parser",
}
USER_ERRORS = (ImageLoadError, ModelLoadError, FileNotFoundError, ValueError)
GENERATION_KEYS = tuple(field.name for field in fields(GenerationOptions))  # also the --flags, with dashes


class CLIError(Exception):
    """A user mistake: reported as one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the sub-command and pointing to --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Build only the named command's parser: `serve` and `demo` import FastAPI and Gradio, seconds of start-up.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser([command] if command in SUBCOMMANDS else SUBCOMMANDS).parse_args(argv)
    try:
        return args.handler(args)
    except (CLIError, *USER_ERRORS) as error:
        print(f"deepseek-vl2: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def build_parser(commands: Iterable[str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="deepseek-vl2",
        description="DeepSeek-VL2 vision-language chat: answer questions about images, find objects "
        "(visual grounding), read text (OCR), documents, tables and charts.",
        epilog="Run 'deepseek-vl2 COMMAND --help' for the options of a command.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name in commands:
        _register(subparsers, name, SUBCOMMANDS[name])
    return parser


def _register(subparsers: argparse._SubParsersAction, name: str, target: str) -> None:
    """Import the module that adds a sub-command; a module that is absent is skipped, a broken one reported."""
    module_name, _, function = target.partition(":")
    if importlib.util.find_spec(module_name) is None:
        return
    try:
        add_parser: Callable[[argparse._SubParsersAction], Any] = getattr(
            importlib.import_module(module_name), function
        )
    except ImportError as error:
        reason = f"the {name} command is unavailable: {error}"
        stub = subparsers.add_parser(name, help=f"(unavailable: {error})", add_help=False)
        stub.add_argument("rest", nargs=argparse.REMAINDER)
        stub.set_defaults(handler=lambda args: _fail(reason))
        return
    add_parser(subparsers)


def _fail(message: str) -> int:
    raise CLIError(message)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="Hub repo id (deepseek-ai/deepseek-vl2-tiny, -small, deepseek-ai/deepseek-vl2) or a local checkpoint "
        "folder; a repo is downloaded once to the Hugging Face cache (default: %(default)s)",
    )  # fmt: skip
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    group.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = bfloat16 on cuda, float32 on cpu (default: %(default)s)",
    )  # fmt: skip


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    defaults = GenerationOptions()
    group.add_argument(
        "--max-new-tokens", type=_option_type("max_new_tokens", int), default=defaults.max_new_tokens, metavar="N",
        help="longest answer in tokens (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--temperature", type=_option_type("temperature", float), default=defaults.temperature, metavar="T",
        help="0 = greedy (the model card's default); sampling above 0, at most 0.7 recommended (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--top-p", type=_option_type("top_p", float), default=defaults.top_p, metavar="P",
        help="nucleus sampling mass in (0, 1], used when --temperature > 0 (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--repetition-penalty", type=_option_type("repetition_penalty", float),
        default=defaults.repetition_penalty, metavar="R", help="> 1 discourages repeats, 1 = off (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--stop", action="append", default=[], metavar="TEXT",
        help="stop the answer before this text (repeatable)",
    )  # fmt: skip
    group.add_argument("--seed", type=_option_type("seed", int), metavar="N", help="random seed for sampling")
    group.add_argument(
        "--chunk-size", type=_option_type("chunk_size", int), metavar="N",
        help="prefill the prompt N tokens at a time (less memory for long multi-image prompts)",
    )  # fmt: skip
    group.add_argument("--system-prompt", metavar="TEXT", help="system message given to the model before the chat")
    group.add_argument(
        "--exif-transpose", action="store_true",
        help="rotate photos by their EXIF orientation (off by default, like the official preprocessing)",
    )  # fmt: skip


def _option_type(name: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that applies GenerationOptions' own validation, so the CLI and the API agree."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
            GenerationOptions(**{name: value})
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error) if "must" in str(error) else f"invalid value {text!r}")
        return value

    parse.__name__ = convert.__name__
    return parse


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chat()/chat_batch() keyword arguments given on the command line."""
    return {name: getattr(args, name) for name in GENERATION_KEYS} | {
        "system_prompt": args.system_prompt,
        "exif_transpose": args.exif_transpose,
    }


def load_chat(args: argparse.Namespace) -> VLChat:
    """Load the model named by --model/--device/--dtype, saying so on stderr (transformers shows a progress bar)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    print(f"Loading {args.model} on {device} ({str(dtype).removeprefix('torch.')})...", file=sys.stderr, flush=True)
    return VLChat.from_pretrained(args.model, device=device, dtype=dtype)


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer one prompt about zero or more images",
        description="Answer one prompt. Images are attached in order to the <image> tags of the prompt, or,\n"
        "without tags, placed before it. The answer is streamed to stdout.",
        epilog="examples:\n"
        "  deepseek-vl2 generate 'Describe this image.' -i photo.jpg\n"
        "  deepseek-vl2 generate '<|ref|>The giraffe at the back<|/ref|>.' -i zoo.jpg --annotate boxes.png\n"
        "  deepseek-vl2 generate 'Image 1: <image>\\nImage 2: <image>\\nWhat differs?' -i a.jpg -i b.jpg --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prompt", help="the question or instruction; a typed \\n is a line break; '-' reads the prompt from stdin"
    )
    parser.add_argument(
        "-i", "--image", action="append", default=[], metavar="IMAGE",
        help="image path, file:// or http(s):// URL, or data: URL (repeatable, in prompt order)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object: text, boxes (0..999 and pixels of the last image), token counts, finish_reason",
    )  # fmt: skip
    parser.add_argument("--annotate", metavar="OUT.png", help="write the last image with the answer's boxes drawn")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else typed_line_breaks(args.prompt)
    if args.annotate and not args.image:
        raise CLIError("--annotate needs at least one --image to draw on")
    if args.annotate and not Path(args.annotate).resolve().parent.is_dir():
        raise CLIError(f"cannot write {args.annotate!r}: its folder does not exist")
    if args.annotate and Path(args.annotate).suffix.lower() not in Image.registered_extensions():
        raise CLIError(f"cannot write {args.annotate!r}: use an image file extension such as .png or .jpg")
    images = [load_image(source, exif_transpose=args.exif_transpose) for source in args.image]
    pipe = load_chat(args)
    messages = [{"role": "user", "content": prompt}]
    options = generation_options(args) | {"exif_transpose": False}  # the images are already loaded (and rotated)
    if args.json:
        result = pipe.chat(messages, images, **options)
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        result = print_stream(pipe.chat(messages, images, stream=True, **options))
    if args.annotate:
        draw_grounding(images[-1], result.grounding).save(args.annotate)
        print(f"wrote {args.annotate} ({len(result.grounding.boxes)} boxes)", file=sys.stderr)
    return 0


def typed_line_breaks(text: str) -> str:
    """A backslash-n typed on a command line or at the chat prompt becomes a line break, as in the model card."""
    return text.replace("\\n", "\n")


def print_stream(stream: ChatStream) -> ChatResult | None:
    """Print an answer as it is generated, then a newline; Ctrl-C stops it (the partial answer is kept)."""
    try:
        for piece in stream:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()
        print(" [stopped]", end="")
    print(flush=True)
    return stream.result


REPL_HELP = "/image PATH attaches an image to your next message, /reset clears the conversation, /exit quits"


def add_chat_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="interactive multi-turn chat in the terminal, answers streamed",
        description=f"Chat in the terminal: type a message and press Enter.\n{REPL_HELP} (Ctrl-D too).\n"
        "Ctrl-C stops an answer and returns to the prompt. Earlier images stay with the turns they were sent in.",
        epilog="example:\n  deepseek-vl2 chat -i chart.png\n  >>> What does the chart show?\n"
        "  >>> /image table.png\n  >>> Convert this table to markdown.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-i", "--image", action="append", default=[], metavar="IMAGE", help="image for the first message (repeatable)"
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.set_defaults(handler=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    pending = [load_image(source, exif_transpose=args.exif_transpose) for source in args.image]
    pipe = load_chat(args)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Chat with {args.model}: {REPL_HELP}.", file=sys.stderr)
    options = generation_options(args) | {"exif_transpose": False}  # images are loaded (and rotated) on /image
    history: list[dict[str, Any]] = []
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        command, _, argument = line.partition(" ")
        if not line:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history, pending = [], []
            print("(conversation cleared)")
        elif command == "/image":
            try:
                pending.append(load_image(argument.strip(), exif_transpose=args.exif_transpose))
                print(f"(image {pending[-1].width}x{pending[-1].height} attached to your next message)")
            except ImageLoadError as error:
                print(f"error: {error}", file=sys.stderr)
        elif command.startswith("/"):
            print(f"unknown command {command}; {REPL_HELP}")
        else:
            message = {"role": "user", "content": typed_line_breaks(line), "images": pending}
            try:
                result = print_stream(pipe.chat([*history, message], **options, stream=True))
            except USER_ERRORS as error:
                print(f"error: {error}", file=sys.stderr)
                continue
            except KeyboardInterrupt:  # while the images were being prepared
                print(" [stopped]")
                continue
            if result is not None:
                history += [message, {"role": "assistant", "content": result.text}]
                pending = []


BATCH_DESCRIPTION = """\
Answer a JSONL file of requests, several at a time (one batched forward per token), appending one JSON line
per request to OUTPUT. Re-running with the same OUTPUT skips the lines already answered, so an interrupted run
resumes where it stopped.

Input lines:
  {"id": "q1", "messages": [{"role": "user", "content": "What is shown?", "images": ["cat.jpg"]}]}
  {"id": "q2", "prompt": "<|ref|>the cat<|/ref|>.", "images": ["cat.jpg"], "max_new_tokens": 64}
"messages" (user/assistant/system turns) or "prompt" (one user message) is required. "images" is a flat list
for the <image> tags, or, without tags, for the last user message; relative paths are relative to INPUT.
Optional per line (the command-line values are the defaults):
  %s

Output lines, in input order within each batch:
  {"id": "q1", "line": 1, "text": ..., "boxes": [...], "prompt_tokens": ..., "completion_tokens": ...,
   "finish_reason": "stop" | "length"}
  {"id": "q3", "line": 3, "error": "..."}   for a line that could not be answered; the others go on.
"""
LINE_OPTIONS = (*GENERATION_KEYS, "system_prompt")
_REQUEST_KEYS = {"id", "messages", "prompt", "images", *LINE_OPTIONS}


def add_batch_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="answer a JSONL file of requests in batches; resumable",
        description=BATCH_DESCRIPTION % ", ".join(LINE_OPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="INPUT", help="JSONL file of requests, one JSON object per line")
    parser.add_argument("output", metavar="OUTPUT", help="JSONL file the answers are appended to")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=8, metavar="N",
        help="requests generated together (default: %(default)s)",
    )  # fmt: skip
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.set_defaults(handler=run_batch)


class _Request:
    """One input line: its conversation and options, or why it cannot be answered."""

    def __init__(self, line: int, text: str, base: Path, defaults: dict[str, Any]) -> None:
        self.line, self.id, self.error = line, None, None
        self.messages: list[dict[str, Any]] = []
        self.images: list | None = None
        self.options: dict[str, Any] = {}
        try:
            self._parse(text, base, defaults)
        except ValueError as error:
            self.error = str(error)

    def _parse(self, text: str, base: Path, defaults: dict[str, Any]) -> None:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not valid JSON: {error.msg} at column {error.colno}") from error
        if not isinstance(data, dict):
            raise ValueError("a request must be a JSON object")
        self.id = data.get("id")
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
        GenerationOptions(**{key: value for key, value in self.options.items() if key in GENERATION_KEYS})

    def group_key(self) -> str:
        return json.dumps(self.options, sort_keys=True)


def _relative_to(sources: Any, base: Path) -> Any:
    """Relative image paths of a request file are relative to that file, wherever the command runs."""
    if not isinstance(sources, list):
        raise ValueError('"images" must be a list')
    return [
        str(base / s) if isinstance(s, str) and ":" not in s and not Path(s).expanduser().is_absolute() else s
        for s in sources
    ]


def run_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    source, target = Path(args.input), Path(args.output)
    if not source.is_file():
        raise CLIError(f"input file {args.input!r} does not exist")
    if target.exists() and target.resolve() == source.resolve():
        raise CLIError("OUTPUT must be a different file from INPUT")
    defaults = {key: value for key, value in generation_options(args).items() if key in LINE_OPTIONS}
    lines = source.read_text(encoding="utf-8").splitlines()
    requests = [_Request(n, text, source.resolve().parent, defaults) for n, text in enumerate(lines, 1) if text.strip()]
    done = _answered_lines(target)
    for request in requests:
        if request.line in done and done[request.line] != request.id:
            raise CLIError(
                f"{args.output} holds an answer to line {request.line} with id {done[request.line]!r} but that line "
                f"of {args.input} has id {request.id!r}; it belongs to another input: pass a new OUTPUT file"
            )
    todo = [request for request in requests if request.line not in done]
    pipe = load_chat(args) if any(request.error is None for request in todo) else None
    errors = 0
    with (
        target.open("a", encoding="utf-8") as out,
        tqdm(
            total=len(requests), initial=len(requests) - len(todo), desc="answering", unit="line", file=sys.stderr
        ) as bar,
    ):
        for start in range(0, len(todo), args.batch_size):
            for request, outcome in _answer_chunk(pipe, todo[start : start + args.batch_size], args):
                record: dict[str, Any] = {"id": request.id, "line": request.line}
                if isinstance(outcome, ChatResult):
                    record |= outcome.to_dict()
                else:
                    record["error"] = outcome
                    errors += 1
                    bar.write(f"line {request.line}: {outcome}", file=sys.stderr)
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                bar.update(1)
    print(f"{len(todo)} lines answered ({errors} errors), {len(requests) - len(todo)} already done: {target}",
          file=sys.stderr)  # fmt: skip
    return 0


def _answer_chunk(pipe: VLChat | None, chunk: list[_Request], args: argparse.Namespace) -> list[tuple]:
    """(request, ChatResult or error message) in line order; requests with equal options share a batch."""
    answers = [(request, request.error) for request in chunk if request.error is not None]
    groups: dict[str, list[_Request]] = {}
    for request in chunk:
        if request.error is None:
            groups.setdefault(request.group_key(), []).append(request)
    for group in groups.values():
        answers += _answer_group(pipe, group, args)
    return sorted(answers, key=lambda pair: pair[0].line)


def _answer_group(pipe: VLChat, group: list[_Request], args: argparse.Namespace) -> list[tuple]:
    """One batched generation; if it fails, each request alone, so one bad line only fails itself."""
    try:
        results = pipe.chat_batch(
            [request.messages for request in group],
            images=[request.images for request in group],
            exif_transpose=args.exif_transpose,
            **group[0].options,
        )
        return list(zip(group, results))
    except (*USER_ERRORS, RuntimeError) as error:  # RuntimeError: e.g. out of memory for the whole batch
        if len(group) == 1:
            return [(group[0], f"{type(error).__name__}: {error}")]
        return [pair for request in group for pair in _answer_group(pipe, [request], args)]


def _answered_lines(target: Path) -> dict[int, Any]:
    """Line number -> id of the answers already in OUTPUT; a last line cut off mid-write is removed first."""
    if not target.exists():
        return {}
    data = target.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with target.open("r+b") as file:
            file.truncate(len(complete))
    done = {}
    for raw in complete.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("line"), int):
            done[record["line"]] = record.get("id")
    return done
