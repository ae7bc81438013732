"""Options of the `serve` and `demo` sub-commands, kept apart from the servers so that `--help` and a mistyped
option answer at once: FastAPI and Gradio are imported by `server.run` and `demo.run` when the command runs.

Add a serve flag here (and the matching `create_app` keyword argument in server.py; `tests/test_cli.py` checks that
the defaults agree). Nothing heavy may be imported at module level.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket

from deepseek_vl.serve.cli import CLIError, add_model_arguments, positive_int

__all__ = ["API_KEY_ENV", "SERVE_TUNING", "add_demo_parser", "add_serve_parser", "check_port", "run_demo", "run_serve"]

API_KEY_ENV = "DEEPSEEK_VL2_API_KEY"
MiB = 1024 * 1024

SERVE_TUNING: dict[str, tuple[int | float | str, str]] = {
    "max_body_bytes": (32 * MiB, "largest request body in bytes; 413 above"),
    "max_images": (8, "most images per request"),
    "max_image_pixels": (4096 * 4096, "most pixels (width x height) per image"),
    "remote_image_timeout": (10.0, "seconds allowed per image download (with --allow-remote-images)"),
    "remote_image_max_bytes": (16 * MiB, "size cap per downloaded image"),
    "default_max_tokens": (512, "generation budget of a request that sends no max_tokens"),
    "batch_window_ms": (20.0, "how long the oldest waiting request waits for others to batch with"),
    "max_batch_size": (8, "most requests generated together (the engine's batch rows)"),
    "scheduler": ("engine", "engine: continuous batching; window: the older window batcher, for comparison"),
    "prefill_budget": (512, "most prompt tokens run per engine step (long prompts are prefilled in chunks)"),
    "vision_cache_mb": (256, "memory for image tiles and features reused by requests with the same image (0: off)"),
    "prefix_cache_mb": (1024, "memory for finished turns' caches, reused by the conversation's next turn (0: off)"),
    "max_queue": (64, "most requests in progress (waiting or generating); 503 with Retry-After above"),
    "max_request_pixels": (2 * 4096 * 4096, "most image pixels in one request, all its images together"),
    "max_inflight_pixels": (8 * 4096 * 4096, "most image pixels of all requests in progress; 503 above"),
    "request_timeout": (30.0, "seconds a client has to send its request body; 408 after"),
}
"""`create_app` keyword argument -> (default, help); each is the --flag with dashes."""
SERVE_CHOICES = {"scheduler": ("engine", "window")}

SERVE_DESCRIPTION = """\
Serve an OpenAI-compatible HTTP API: POST /v1/chat/completions (plain and streamed), GET /v1/models, GET /health.
The model is loaded once; clients pass the served name (--model-name, else the checkpoint folder's name or the Hub id) as "model".
Ctrl-C stops running generations, ends open streams with an error event and exits with status 0.
"""
DEMO_DESCRIPTION = """\
Serve the Gradio web demo: upload images, chat over several turns with streamed answers, see grounding boxes
drawn on the last image. Open http://HOST:PORT in a browser; Ctrl-C stops it.
"""


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API (chat completions, streaming)", description=SERVE_DESCRIPTION,
        epilog="example:\n  deepseek-vl2 serve --model deepseek-ai/deepseek-vl2-tiny --model-name tiny --port 8000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--model-name", metavar="NAME", help="the name clients pass as 'model' (default: the checkpoint folder's name, or the Hub id)")
    _add_address(server, port=8000)
    server.add_argument(
        "--api-key", metavar="KEY", default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})",
    )  # fmt: skip
    server.add_argument(
        "--allow-remote-images", action="store_true",
        help="let image_url fetch http(s) URLs (by default only base64 data URLs are accepted)",
    )  # fmt: skip
    server.add_argument(
        "--allowed-hosts", action="append", default=[], metavar="NAME",
        help="a host name clients may use in the Host header besides IP addresses and localhost (repeatable; '*': "
        "any). Guards against DNS rebinding; needed when clients reach the server by a DNS name",
    )  # fmt: skip
    server.add_argument(
        "--allow-image-hosts", action="append", default=[], metavar="HOST",
        help="a host, IP address or network (10.0.0.0/8) that remote images may come from although it is not "
        "public (repeatable; by default loopback, private and link-local addresses are refused)",
    )  # fmt: skip
    server.add_argument(
        "--limit-concurrency", type=positive_int, default=256, metavar="N",
        help="most open connections and requests; uvicorn answers 503 above (default: %(default)s)",
    )  # fmt: skip
    server.add_argument(
        "--timeout-keep-alive", type=float, default=5.0, metavar="S",
        help="seconds an idle keep-alive connection stays open (default: %(default)s)",
    )  # fmt: skip
    limits = parser.add_argument_group("limits and batching")
    for name, (default, help_text) in SERVE_TUNING.items():
        kind = type(default)
        limits.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=default, metavar="N" if kind is not str else None,
            choices=SERVE_CHOICES.get(name), help=f"{help_text} (default: %(default)s)",
        )  # fmt: skip
    parser.set_defaults(handler=run_serve)
    return parser


def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="Gradio web demo (upload images, chat, see grounding boxes)", description=DEMO_DESCRIPTION,
        epilog="example:\n  deepseek-vl2 demo --model deepseek-ai/deepseek-vl2-tiny --examples-dir path/to/images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add_model_arguments(parser)
    server = parser.add_argument_group("web demo")
    _add_address(server, port=7860)
    server.add_argument(
        "--examples-dir", metavar="DIR",
        help="folder with the model card's example images (the official repo's images/); without it the "
        "examples are prompts only",
    )  # fmt: skip
    server.add_argument(
        "--max-images", type=positive_int, default=8, metavar="N", help="most images per conversation (default: 8)"
    )
    server.add_argument(
        "--max-image-pixels", type=positive_int, default=4096 * 4096, metavar="N",
        help="most pixels per image (default: %(default)s)",
    )  # fmt: skip
    server.add_argument(
        "--exif-transpose", action="store_true",
        help="turn uploaded photos upright by their EXIF orientation, as the browser shows them (off by default, "
        "like the official preprocessing: the model then sees a phone photo sideways)",
    )  # fmt: skip
    parser.set_defaults(handler=run_demo)
    return parser


def _add_address(group: argparse._ArgumentGroup, port: int) -> None:
    group.add_argument(
        "--host", default="127.0.0.1", metavar="HOST",
        help="address to listen on; 0.0.0.0 for every network interface (default: %(default)s, this machine only)",
    )  # fmt: skip
    group.add_argument("--port", type=_port, default=port, metavar="PORT", help="TCP port (default: %(default)s)")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port number 1..65535, got {text!r}")
    return int(text)


def run_serve(args: argparse.Namespace) -> int:
    check_port(args.host, args.port)  # before FastAPI, torch and the model are imported: a busy port is instant
    from deepseek_vl.serve.server import run

    return run(args)


def run_demo(args: argparse.Namespace) -> int:
    check_port(args.host, args.port)
    from deepseek_vl.serve.demo import run

    return run(args)


def check_port(host: str, port: int) -> None:
    """Fail before the model loads (a minute for the larger ones) if the address cannot be listened on."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise CLIError(f"cannot listen on host {host!r}: {error.strerror}") from error
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise CLIError(f"port {port} on {host} is in use (another server?); pass --port N") from error
            raise CLIError(f"cannot listen on {host}:{port}: {error.strerror}") from error
