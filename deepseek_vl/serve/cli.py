"""The `deepseek-vl2` command (also `python -m deepseek_vl`): generate, chat, batch, serve and demo.

Start-up is instant: this module and every parser-building function import nothing heavy, so `--help`,
`--version` and argument errors answer in milliseconds; torch, transformers, FastAPI and Gradio are imported by the
command that runs. Sub-commands are "module:function" entries of `SUBCOMMANDS`: the function adds its parser to the
sub-parsers object and sets `handler`, a function (args -> exit status) or a "module:function" string imported only
when the command runs. Other modules reuse `add_model_arguments`, `add_generation_arguments`,
`generation_options` and `load_chat`.

User errors (bad paths, option values, a model that cannot be found) print one line on stderr and exit with 2;
Ctrl-C exits with 130 after keeping what was generated.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepseek_vl import __version__
from deepseek_vl.options import DEFAULT_MODEL, GenerationOptions, ModelLoadError

if TYPE_CHECKING:
    from deepseek_vl.chat import ChatResult, ChatStream, VLChat

__all__ = [
    "SUBCOMMANDS", "USER_ERRORS", "CLIError", "add_generation_arguments", "add_model_arguments", "build_parser",
    "generation_options", "load_chat", "main",
]  # fmt: skip

SUBCOMMANDS: dict[str, str] = {
    "generate": "deepseek_vl.serve.cli:add_generate_parser",
    "chat": "deepseek_vl.serve.cli:add_chat_parser",
    "batch": "deepseek_vl.serve.batch:add_parser",
    "serve": "deepseek_vl.serve.commands:add_serve_parser",
    "demo": "deepseek_vl.serve.commands:add_demo_parser",
    "eval": "deepseek_vl.eval.cli:add_parser",
    "finetune": "deepseek_vl.train.cli:add_finetune_parser",
    "merge": "deepseek_vl.train.cli:add_merge_parser",
}


class CLIError(Exception):
    """A user mistake: reported as one line on stderr, exit status 2."""


# The extra that installs an optional package a command imports when it runs (else the command's own extra).
EXTRAS = {"xgrammar": "serve", "pyarrow": "distributed", "ray": "distributed", "peft": "train", "torchao": "quant",
          "lmms_eval": "eval"}  # fmt: skip
USER_ERRORS = (CLIError, ModelLoadError, FileNotFoundError, ValueError)  # ImageLoadError is a ValueError
GENERATION_KEYS = tuple(field.name for field in fields(GenerationOptions))  # also the --flags, with dashes
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the sub-command and pointing to its --help."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the sub-command's parser, which lists the options that do exist
        _subparsers(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return _resolve(args.handler)(args)
    except USER_ERRORS as error:
        print(f"deepseek-vl2: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # an optional dependency of the command, imported when it runs
        if not error.name or error.name.partition(".")[0] == "deepseek_vl":
            raise
        package = error.name.partition(".")[0]
        extra = EXTRAS.get(package) or {"finetune": "train", "merge": "train"}.get(args.command, args.command)
        print(
            f"deepseek-vl2: error: the {args.command} command needs the package {error.name!r}: "
            f"pip install -e '.[{extra}]' (or pip install 'deepseek-vl2[{extra}]')", file=sys.stderr,
        )  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print("\ndeepseek-vl2: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="deepseek-vl2",
        description="DeepSeek-VL2 vision-language chat: answer questions about images, find objects "
        "(visual grounding), read text (OCR), documents, tables and charts.",
        epilog="Run 'deepseek-vl2 COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action=VersionAction, help="print the versions of this package, torch, "
                        "transformers, Pillow and Python, then exit")
    subparsers = parser.add_subparsers(
        title="commands", metavar="COMMAND", dest="command", required=True, parser_class=OneLineParser
    )
    for name, target in SUBCOMMANDS.items():
        _register(subparsers, name, target)
    return parser


class VersionAction(argparse.Action):
    """--version: one unwrapped line, computed only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_line())
        parser.exit(0)


def version_line() -> str:
    """This package's version and the installed versions that matter in a bug report (read without importing)."""
    installed = []
    for package in ("torch", "transformers", "pillow"):
        try:
            installed.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            installed.append(f"{package} not installed")
    return f"deepseek-vl2 {__version__} ({', '.join(installed)}, Python {sys.version.split()[0]})"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]


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


def _resolve(handler: Callable[[argparse.Namespace], int] | str) -> Callable[[argparse.Namespace], int]:
    """A handler given as "module:function" is imported only now, when its command runs."""
    if callable(handler):
        return handler
    module_name, _, function = handler.partition(":")
    return getattr(importlib.import_module(module_name), function)


def _fail(message: str) -> int:
    raise CLIError(message)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model", default=DEFAULT_MODEL, metavar="MODEL",
        help="Hub repo id (deepseek-ai/deepseek-vl2-tiny, -small, deepseek-ai/deepseek-vl2) or a local checkpoint "
        "folder; a repo is downloaded once to the Hugging Face cache (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--device", default="auto", type=_device, metavar="DEVICE",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps (default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], metavar="DTYPE",
        help="weights dtype: auto, float32, bfloat16 or float16; auto = bfloat16 on cuda, float32 on cpu "
        "(default: %(default)s)",
    )  # fmt: skip
    group.add_argument(
        "--adapter", default=None, metavar="FOLDER",
        help="a LoRA adapter folder from 'deepseek-vl2 finetune', merged into the model's weights at load",
    )  # fmt: skip
    group.add_argument(
        "--quantize", default=None, choices=["int8", "int4", "nf4"], metavar="MODE",
        help="int8 or int4 weights for the language model (CPU and CUDA; half / a quarter of the bytes, faster "
        "decoding), nf4 (CPU and CUDA, needs bitsandbytes; QLoRA's format); quantized while loading, --dtype auto "
        "becomes bfloat16",
    )  # fmt: skip


def _device(text: str) -> str:
    if not DEVICE_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps")
    return text


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    defaults = GenerationOptions()
    group.add_argument(
        "--max-new-tokens", type=_option_type("max_new_tokens", int), default=defaults.max_new_tokens, metavar="N",
        help="longest answer in tokens; prompt + answer must fit the model's context (default: %(default)s)",
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
    group.add_argument(
        "--max-image-pixels", type=positive_int, metavar="N",
        help="refuse images of more than N pixels (width x height), checked before decoding (default: 50000000)",
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


def positive_int(text: str) -> int:
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
    from deepseek_vl.chat import VLChat, load_dtype, resolve_device

    device = resolve_device(args.device)
    dtype = load_dtype(args.model, args.dtype, device, getattr(args, "quantize", None))
    print(f"Loading {args.model} on {device} ({str(dtype).removeprefix('torch.')})...", file=sys.stderr, flush=True)
    chat = VLChat.from_pretrained(
        args.model, device=device, dtype=dtype, adapter=getattr(args, "adapter", None), quantize=getattr(args, "quantize", None)
    )
    if getattr(args, "max_image_pixels", None):  # serve and demo: their per-image limit; the others: the flag
        chat.max_image_pixels = args.max_image_pixels
    return chat


def image_limits(args: argparse.Namespace) -> dict[str, Any]:
    """`load_image` keywords for the images named on the command line."""
    limit = getattr(args, "max_image_pixels", None)
    return {"exif_transpose": args.exif_transpose, **({"max_pixels": limit} if limit else {})}


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer one prompt about zero or more images",
        description="Answer one prompt. Images are attached in order to the <image> tags of the prompt, or,\n"
        "without tags, placed before it. The answer is streamed to stdout; Ctrl-C stops it, keeps the part\n"
        "generated so far (with --json: finish_reason \"cancelled\") and exits with status 130.",
        epilog="examples:\n"
        "  deepseek-vl2 generate 'Describe this image.' -i photo.jpg\n"
        "  deepseek-vl2 generate '<|ref|>The giraffe at the back<|/ref|>.' -i zoo.jpg --annotate boxes.png\n"
        "  deepseek-vl2 generate 'Image 1: <image>\\nImage 2: <image>\\nWhat differs?' -i a.jpg -i b.jpg --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "prompt", metavar="PROMPT",
        help="the question or instruction; a typed \\n is a line break; '-' reads the prompt from stdin",
    )  # fmt: skip
    parser.add_argument(
        "-i", "--image", action="append", default=[], metavar="IMAGE",
        help="image path, file:// or http(s):// URL, or data: URL (repeatable, in prompt order)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object: text, boxes (0..999 and pixels of the last image), token counts, finish_reason",
    )  # fmt: skip
    parser.add_argument("--annotate", metavar="OUT.png", help="write the last image with the answer's boxes drawn")
    parser.add_argument(
        "--json-schema", metavar="FILE",
        help="answer with JSON that validates against this JSON schema file (structured output, via xgrammar)",
    )  # fmt: skip
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help="print timings on stderr: load, prompt tokens, time to first token, tokens/s",
    )  # fmt: skip
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.set_defaults(handler=run_generate)


def read_json_schema(path: str) -> dict[str, Any]:
    """--json-schema FILE as an OpenAI response_format, checked before the model loads."""
    from deepseek_vl.engine.grammar import check_response_format

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise CLIError(f"cannot read --json-schema {path!r}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CLIError(f"--json-schema {path!r} is not valid JSON: {error}") from error
    if not isinstance(schema, dict):
        raise CLIError(f"--json-schema {path!r} must hold a JSON object (a schema)")
    response_format = {"type": "json_schema", "json_schema": {"name": Path(path).stem, "schema": schema}}
    try:
        check_response_format(response_format)  # now, not after the model has loaded
    except ValueError as error:
        raise CLIError(f"--json-schema {path!r}: {error}") from None
    return response_format


def run_generate(args: argparse.Namespace) -> int:
    from deepseek_vl.grounding import draw_grounding
    from deepseek_vl.utils.io import load_image

    prompt = sys.stdin.read() if args.prompt == "-" else typed_line_breaks(args.prompt)
    check_utf8(prompt, "stdin" if args.prompt == "-" else "the prompt")
    if not prompt.strip() and not args.image:  # an unset shell variable, say: there is nothing to answer
        raise CLIError("the prompt is empty and there is no -i image: give a question or instruction")
    if args.annotate:
        check_annotate_path(args.annotate, bool(args.image))
    tags = prompt.count("<image>")
    if tags and tags != len(args.image):
        raise CLIError(f"the prompt has {tags} <image> tags but {len(args.image)} -i images: give one -i per tag")
    GenerationOptions(**{name: getattr(args, name) for name in GENERATION_KEYS})  # a bad --stop now, not after loading
    response_format = read_json_schema(args.json_schema) if args.json_schema else None
    images = [load_image(source, **image_limits(args)) for source in args.image]
    started = time.perf_counter()
    pipe = load_chat(args)
    loaded = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    options = generation_options(args) | {"exif_transpose": False}  # the images are already loaded (and rotated)
    stream = pipe.chat(messages, images, stream=True, response_format=response_format, **options)
    answer = stream_answer(stream, echo=not args.json)
    result = answer.result
    if result is not None and args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
    if result is not None and args.annotate:  # the boxes are those of the last image, numbered from 0
        drawn = draw_grounding(images[-1], result.grounding, image_index=len(images) - 1)
        try:
            drawn.save(args.annotate)
        except (OSError, ValueError) as error:  # e.g. a format that cannot hold RGB (.xbm); the answer is printed
            raise CLIError(f"cannot write {args.annotate!r}: {error}") from error
        print(f"wrote {args.annotate} ({len(result.grounding.boxes)} boxes)", file=sys.stderr)
    if args.verbose and result is not None:
        print(answer.timings(result, load_seconds=loaded - started), file=sys.stderr)
    if answer.interrupted:
        kept = f"the {result.completion_tokens} tokens generated are kept" if result else "nothing was generated"
        print(f"deepseek-vl2: stopped by Ctrl-C; {kept}", file=sys.stderr)
        return 130
    return 0


def check_annotate_path(path: str, has_images: bool) -> None:
    """--annotate OUT: refused now, before the model loads, if no image file can be written there."""
    from PIL import Image

    target = Path(path)
    if not has_images:
        raise CLIError("--annotate needs at least one --image to draw on")
    if target.is_dir():
        raise CLIError(f"cannot write {path!r}: it is a directory; give a file name such as boxes.png")
    if not target.resolve().parent.is_dir():
        raise CLIError(f"cannot write {path!r}: its folder does not exist")
    if not os.access(target.resolve().parent, os.W_OK):
        raise CLIError(f"cannot write {path!r}: its folder is not writable")
    if Image.registered_extensions().get(target.suffix.lower()) not in Image.SAVE:  # .psd, .fli: Pillow only reads them
        raise CLIError(f"cannot write {path!r}: use an image file extension such as .png or .jpg")


def check_utf8(text: str, source: str) -> None:
    """Python reads stdin and the command line with surrogateescape: a byte that is not UTF-8 (a Latin-1 file, say)
    arrives as a lone surrogate, which the tokenizer cannot take. Said here, in the user's terms."""
    if bad := re.search("[\udc80-\udcff]", text):
        byte = ord(bad.group()) - 0xDC00
        raise CLIError(f"{source} is not UTF-8 (byte {byte:#04x} at character {bad.start() + 1}): convert it to UTF-8")


def typed_line_breaks(text: str) -> str:
    """A backslash-n typed on a command line or at the chat prompt becomes a line break, as in the model card."""
    return text.replace("\\n", "\n")


class StreamedAnswer:
    """An answer read from a ChatStream: the result (partial after Ctrl-C) and when its pieces came."""

    def __init__(self) -> None:
        self.result: ChatResult | None = None
        self.interrupted = False
        self.started = time.perf_counter()
        self.first_piece: float | None = None
        self.finished = self.started

    def timings(self, result: ChatResult, load_seconds: float) -> str:
        """The --verbose summary, like `ollama run --verbose`: load, prompt, first token, decode rate."""
        first = (self.first_piece or self.finished) - self.started
        decode = self.finished - (self.first_piece or self.finished)
        rate = f"{(result.completion_tokens - 1) / decode:.1f} tokens/s" if decode > 0 else "n/a tokens/s"
        return (
            f"load: {load_seconds:.2f} s\nprompt: {result.prompt_tokens} tokens, first token after {first:.2f} s\n"
            f"answer: {result.completion_tokens} tokens in {self.finished - self.started:.2f} s, {rate} after the "
            f"first ({result.finish_reason})"
        )


def stream_answer(stream: ChatStream, *, echo: bool) -> StreamedAnswer:
    """Print the pieces of an answer as they come (echo), else show progress on a terminal's stderr; Ctrl-C stops
    the generation and keeps what was generated (finish_reason "cancelled").

    Ctrl-C only asks the generation to stop (a second one interrupts at once): an exception raised between printing
    a piece and recording it would print that piece twice, or lose it.
    """
    answer = StreamedAnswer()
    progress = not echo and sys.stderr.isatty()
    shown, characters, last_update = "", 0, 0.0

    def stop(signum: int, frame: Any) -> None:
        if answer.interrupted:
            raise KeyboardInterrupt
        answer.interrupted = True
        stream.cancel()

    previous = signal.signal(signal.SIGINT, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        for piece in stream:
            answer.first_piece = answer.first_piece or time.perf_counter()
            if echo:
                print(piece, end="", flush=True)
                shown += piece
            elif progress:
                characters += len(piece)
                if time.perf_counter() - last_update > 0.25:
                    last_update = time.perf_counter()
                    print(f"\rgenerating: {characters} characters", end="", file=sys.stderr, flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    answer.finished = time.perf_counter()
    answer.result = stream.result
    if progress and last_update:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if echo:
        text = answer.result.text if answer.result is not None else shown
        print(text[len(shown) :] if text.startswith(shown) else "", flush=True)
    return answer


REPL_HELP = (
    "/image PATH attaches an image to your next message, /reset clears the conversation, /help shows this, /exit quits"
)


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
    from deepseek_vl.utils.io import ImageLoadError, load_image

    pending = [load_image(source, **image_limits(args)) for source in args.image]
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
        if command == "/help":
            print(REPL_HELP)
        elif command == "/reset":
            history, pending = [], []
            print("(conversation cleared)")
        elif command == "/image":
            path = argument.strip()
            if len(path) > 1 and path[0] == path[-1] and path[0] in "'\"":  # a quoted path with spaces
                path = path[1:-1]
            if not path:
                print("usage: /image PATH (a file, URL or data: URL)", file=sys.stderr)
                continue
            try:
                pending.append(load_image(path, **image_limits(args)))
                print(f"(image {pending[-1].width}x{pending[-1].height} attached to your next message)")
            except ImageLoadError as error:
                print(f"error: {error}", file=sys.stderr)
        elif command.startswith("/"):
            print(f"unknown command {command}; {REPL_HELP}", file=sys.stderr)
        else:
            message = {"role": "user", "content": typed_line_breaks(line), "images": pending}
            try:
                check_utf8(line, "the line")
                answer = stream_answer(pipe.chat([*history, message], **options, stream=True), echo=True)
            except USER_ERRORS as error:
                full = history and "context" in str(error)
                print(f"error: {error}" + ("; or /reset to start a new conversation" if full else ""), file=sys.stderr)
                continue
            except KeyboardInterrupt:  # while the images were being prepared
                print("[stopped]", file=sys.stderr)
                continue
            if answer.interrupted:
                print("[stopped]", file=sys.stderr)
            if answer.result is not None:
                history += [message, {"role": "assistant", "content": answer.result.text}]
                pending = []
