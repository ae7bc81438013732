"""The `deepseek-vl2` command end to end on the golden Tiny checkpoint (subprocesses, and a pseudo-terminal for
the REPL); argument errors and --help in-process, since they never load the model."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl.chat import VLChat
from deepseek_vl.models import DeepseekVLV2Processor
import deepseek_vl.serve.cli as cli_module
from deepseek_vl.serve.cli import main
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
GIRAFFES = str(GOLDEN / "images" / "visual_grounding_1.jpeg")
SMALL_IMAGE = str(GOLDEN / "images" / "tiny_8x8.png")
GROUNDING_PROMPT = "<|ref|>The giraffe at the back.<|/ref|>."


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "deepseek_vl", *args]
    return subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def test_generate_prints_the_answer(tiny: VLChat) -> None:
    expected = tiny.chat([{"role": "user", "content": GROUNDING_PROMPT, "images": [GIRAFFES]}], max_new_tokens=12)
    run = cli("generate", GROUNDING_PROMPT, "-i", GIRAFFES, "--model", TINY, "--max-new-tokens", "12")
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected.text + "\n"
    assert f"Loading {TINY} on cpu (float32)..." in run.stderr
    assert "_pytree" not in run.stderr and "deprecated" not in run.stderr  # torchao's import-time notices are muted


@pytest.fixture
def loaded(tiny: VLChat, monkeypatch: pytest.MonkeyPatch) -> VLChat:
    """In-process commands use the session's model instead of loading one (subprocess tests load for real)."""
    monkeypatch.setattr(cli_module, "load_chat", lambda args: tiny)
    return tiny


def test_generate_json_and_annotate(loaded: VLChat, tmp_path: Path, capsys) -> None:
    """Also checks that generation options reach chat(): the same call in-process gives the same JSON."""
    options = {"system_prompt": "Answer briefly.", "chunk_size": 256, "temperature": 0.5, "seed": 7, "stop": "zz"}
    messages = [{"role": "user", "content": GROUNDING_PROMPT, "images": [GIRAFFES]}]
    expected = loaded.chat(messages, max_new_tokens=5, **options)
    out = tmp_path / "boxes.png"
    args = ["generate", GROUNDING_PROMPT, "-i", GIRAFFES, "--model", TINY, "--max-new-tokens", "5"]
    flags = ["--system-prompt", "Answer briefly.", "--chunk-size", "256", "--temperature", "0.5", "--seed", "7"]
    assert main([*args, *flags, "--stop", "zz", "--json", "--annotate", str(out)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == expected.to_dict()
    assert set(data) == {"text", "boxes", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert Image.open(out).format == "PNG" and Image.open(out).size == Image.open(GIRAFFES).size


def test_bad_image_path_is_one_line_and_exit_2() -> None:
    run = cli("generate", "What is this?", "-i", "/no/such/image.jpg", "--model", TINY)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "/no/such/image.jpg" in run.stderr and "does not exist" in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""


def test_default_model_offline_says_how_to_pass_a_folder(tmp_path: Path) -> None:
    run = cli("generate", "Hi", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert "could not download 'deepseek-ai/deepseek-vl2-tiny'" in last and "--model /path/to/folder" in last
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("generate", ["--json", "--annotate", "--image", "prompt"]),
        ("chat", ["--image"]),
        ("batch", ["--batch-size", "INPUT", "OUTPUT", '"messages"', "resum", "--retry-errors"]),
    ],
)
def test_help_of_each_command_is_complete(capsys, command: str, options: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    common = ["--model", "deepseek-ai/deepseek-vl2-tiny", "--device", "--dtype", "--max-new-tokens", "--temperature",
              "--top-p", "--repetition-penalty", "--stop", "--seed", "--chunk-size", "--system-prompt",
              "--exif-transpose"]  # fmt: skip
    for option in common + options:
        assert option in text, option


def test_top_level_help_lists_the_commands(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in ("generate", "chat", "batch", "serve", "demo"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--temperature", "3"], "temperature must be a number"),
        (["generate", "hi", "--top-p", "0"], "top_p must be"),
        (["generate", "hi", "--max-new-tokens", "many"], "invalid value 'many'"),
        (["generate", "hi", "--dtype", "int8"], "invalid choice"),
        (["batch", "in.jsonl", "out.jsonl", "--batch-size", "0"], "must be a whole number >= 1"),
        (["generate", "hi", "--annotate", "out.png"], "--annotate needs at least one --image"),
        (["generate", "<image> vs <image>", "-i", GIRAFFES], "2 <image> tags but 1 -i images"),
        (["generate", "hi", "--stop", ""], "stop must be a non-empty string"),
        (["generate", "hi", "-i", GIRAFFES, "--annotate", "boxes.txt"], "use an image file extension"),
        (["batch", "/no/requests.jsonl", "out.jsonl"], "does not exist"),
        (["generate", "hi", "--device", "tpu9"], "unknown device"),
        (["generate", "hi", "--device", "mps", "--model", TINY], "MPS (Apple GPU) is not available; use --device cpu"),
    ],
)
def test_usage_errors_are_one_line(capsys, args: list[str], message: str) -> None:
    try:
        code = main(args)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_annotate_into_a_read_only_folder_fails_before_the_model_loads(capsys, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("deepseek_vl.serve.cli.os.access", lambda path, mode: False)  # tests run as root
    assert main(["generate", "hi", "-i", GIRAFFES, "--annotate", str(tmp_path / "boxes.png")]) == 2
    assert "its folder is not writable" in capsys.readouterr().err


def test_an_unusable_json_schema_fails_before_the_model_loads(capsys, monkeypatch, tmp_path: Path) -> None:
    pytest.importorskip("xgrammar", reason="--json-schema is the serve extra")
    monkeypatch.setattr("deepseek_vl.serve.cli.load_chat", lambda args: pytest.fail("the model loaded"))
    (tmp_path / "schema.json").write_text('{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}')
    assert main(["generate", "hi", "--json-schema", str(tmp_path / "schema.json")]) == 2
    err = capsys.readouterr().err
    assert "is not a usable JSON schema: Cannot find field 'nowhere' in #/nowhere" in err and err.count("\n") == 1


HEAVY_MODULES = ("torch", "transformers", "fastapi", "gradio", "uvicorn", "numpy", "deepseek_vl.models")


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["serve", "--help"], ["demo", "--help"], ["generate", "hi", "--temprature", "1"],
     ["batch", "in.jsonl"], ["serve", "--port", "http"]],
)  # fmt: skip
def test_help_version_and_argument_errors_import_nothing_heavy(args: list[str]) -> None:
    """The start-up contract of cli.py: parse first; torch, transformers, FastAPI, Gradio only in the command."""
    probe = (
        "import sys\nfrom deepseek_vl.serve.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY', sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr


def test_help_version_and_argument_errors_are_instant() -> None:
    """Loosely timed (a busy machine): the target is under 0.5 s, see benchmarks/RESULTS.md."""
    for args in (["--help"], ["--version"], ["generate", "hi", "--max-new-tokens", "lots"], ["chat", "--nope"]):
        started = time.perf_counter()
        run = cli(*args)
        elapsed = time.perf_counter() - started
        assert elapsed < 3, (args, elapsed)
        assert run.returncode == (0 if args[0].startswith("--") else 2), run.stderr
    assert run.stderr.startswith("deepseek-vl2 chat: error: unrecognized arguments: --nope (see deepseek-vl2 chat --help)")
    version = cli("--version").stdout
    assert version.startswith("deepseek-vl2 0.1.0 (torch ") and "transformers" in version and version.count("\n") == 1


def test_subcommand_help_is_for_users() -> None:
    """No module docstrings full of internals; every option documented, --port with its default."""
    for command, port in (("serve", "8000"), ("demo", "7860")):
        text = cli(command, "--help").stdout
        assert f"--port PORT           TCP port (default: {port})" in text
        assert "imported here" not in text and "worker.py" not in text


def test_missing_optional_dependency_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "fastapi.py"
    blocker.write_text("raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n")
    run = cli("serve", "--model", TINY, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert run.returncode == 2
    assert run.stderr.strip().endswith("the serve command needs the package 'fastapi': pip install -e '.[serve]' "
                                       "(or pip install 'deepseek-vl2[serve]')")  # fmt: skip


def test_busy_port_is_found_before_the_model_loads() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        for command in ("serve", "demo"):
            started = time.perf_counter()
            run = cli(command, "--model", "/no/such/model", "--port", port)
            assert run.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in run.stderr, run.stderr
            assert "Loading" not in run.stderr and time.perf_counter() - started < 3


class Terminal:
    """A child process on a pseudo-terminal, driven like a user at a keyboard."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.output = ""
        self.returncode: int | None = None

    def expect(self, text: str, timeout: float = 90) -> str:
        """Read until `text` appears; return (and consume) everything up to and including it."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {text!r}; got {self.output[-500:]!r}"
            if select.select([self.fd], [], [], remaining)[0]:
                try:
                    self.output += os.read(self.fd, 4096).decode(errors="replace").replace("\r\n", "\n")
                except OSError:  # the child exited
                    break
        before, found, self.output = self.output.partition(text)
        assert found, f"{text!r} never came; got {before[-500:]!r}"
        return before + found

    def send(self, data: str) -> None:
        os.write(self.fd, data.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                return self.returncode
            if select.select([self.fd], [], [], 0.1)[0]:
                with contextlib.suppress(OSError):
                    os.read(self.fd, 4096)
        raise AssertionError("the process did not exit")

    def close(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.mark.slow
def test_chat_repl_in_a_terminal(tiny: VLChat) -> None:
    """Ctrl-C mid-answer, /reset, a bad /image, a bare /image, a quoted /image + a question, a follow-up, /exit."""
    env = {**os.environ, "TERM": "dumb"}
    argv = [sys.executable, "-m", "deepseek_vl", "chat", "--model", TINY, "--max-new-tokens", "150"]
    terminal = Terminal(argv, env)
    try:
        terminal.expect(">>> ")
        terminal.send("Tell me a long story.\r")
        terminal.expect("Tell me a long story.\n")
        terminal.expect(" ")  # the answer has started streaming
        terminal.send("\x03")
        terminal.expect("[stopped]")
        terminal.expect(">>> ")
        terminal.send("/reset\r")
        terminal.expect("(conversation cleared)")
        terminal.expect(">>> ")
        terminal.send("/image /no/such.png\r")
        terminal.expect("does not exist")
        terminal.expect(">>> ")
        terminal.send("/image\r")
        terminal.expect("usage: /image PATH")
        terminal.expect(">>> ")
        terminal.send(f'/image "{SMALL_IMAGE}"\r')  # quoted, as a path with spaces would be
        terminal.expect("(image 8x8 attached to your next message)")
        terminal.expect(">>> ")

        first = {"role": "user", "content": "What is this?", "images": [SMALL_IMAGE]}
        answer = tiny.chat([first], max_new_tokens=150).text
        terminal.send("What is this?\r")
        terminal.expect("What is this?\n")
        assert terminal.expect(">>> ") == answer + "\n>>> "

        history = [first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
        follow_up = tiny.chat(history, max_new_tokens=150).text
        terminal.send("And then?\r")
        terminal.expect("And then?\n")
        assert terminal.expect(">>> ") == follow_up + "\n>>> "

        terminal.send("/exit\r")
        assert terminal.wait() == 0
    finally:
        terminal.close()


def start_generate(*extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "deepseek_vl", "generate", "Tell me a long story.", "--model", TINY, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_ctrl_c_keeps_the_partial_answer_and_exits_130(tiny: VLChat) -> None:
    process = start_generate("--max-new-tokens", "2000", "--verbose")
    try:
        first = os.read(process.stdout.fileno(), 1)  # the answer has started streaming
        process.send_signal(signal.SIGINT)
        rest, err = (out.decode() for out in process.communicate(timeout=120))
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "[stopped]" not in rest
    tokens = int(re.search(r"answer: (\d+) tokens in .* \(cancelled\)", err).group(1))  # the --verbose summary
    assert "first token after" in err and f"stopped by Ctrl-C; the {tokens} tokens generated are kept" in err
    expected = tiny.chat([{"role": "user", "content": "Tell me a long story."}], max_new_tokens=tokens).text
    assert 0 < tokens < 2000 and (first.decode() + rest) == expected + "\n"  # all that was generated, intact


@pytest.mark.slow
def test_ctrl_c_with_json_prints_the_partial_answer_as_cancelled() -> None:
    """On a terminal, --json shows progress on stderr; Ctrl-C still prints the JSON, finish_reason cancelled."""
    argv = [sys.executable, "-m", "deepseek_vl", "generate", "Tell me a long story.", "--model", TINY, "--json",
            "--max-new-tokens", "2000"]  # fmt: skip
    terminal = Terminal(argv, {**os.environ, "TERM": "dumb"})
    try:
        terminal.expect("generating: ")
        terminal.send("\x03")
        output = terminal.expect("stopped by Ctrl-C")
        assert terminal.wait() == 130
    finally:
        terminal.close()
    data = json.loads(re.search(r"\{.*\}", output).group(0))  # after the progress line, cleared
    assert data["finish_reason"] == "cancelled" and 0 < data["completion_tokens"] < 2000 and data["text"]
    assert "Traceback" not in output


@pytest.mark.slow
def test_ctrl_c_while_loading_is_one_line() -> None:
    process = start_generate("--max-new-tokens", "2000")
    try:
        while b"Loading" not in process.stderr.readline():
            pass
        process.send_signal(signal.SIGINT)
        err = process.communicate(timeout=120)[1].decode()
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in err and err.rstrip().endswith(("deepseek-vl2: interrupted", "tokens generated are kept"))


def test_max_new_tokens_beyond_the_context_is_refused_at_once(loaded: VLChat, capsys) -> None:
    started = time.perf_counter()
    assert main(["generate", "Hi", "--model", TINY, "--max-new-tokens", "100000000"]) == 2
    assert time.perf_counter() - started < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "context length exceeded" in err and "context of 4096 tokens" in err
    assert "lower max_new_tokens to" in err


@pytest.mark.slow
def test_serve_ctrl_c_ends_a_running_stream_and_exits_0() -> None:
    """The first Ctrl-C stops the generation: the open stream gets an error event and ends, the server exits 0."""
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "deepseek_vl", "serve", "--model", TINY, "--model-name", "tiny", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while server.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        request = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
                   "max_tokens": 3000, "stream": True}  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.Client(trust_env=False, timeout=60) as client, client.stream("POST", url, json=request) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # the answer is streaming
            server.send_signal(signal.SIGINT)
            stopped = time.monotonic()
            rest = list(lines)
        assert time.monotonic() - stopped < 20, "the stream went on after Ctrl-C"
        assert server.wait(timeout=60) == 0
        err = server.stderr.read()
    finally:
        server.kill()
    events = [line for line in rest if line.startswith("data:")]
    assert len(events) < 1000 and any("server_shutting_down" in event for event in events), events[-3:]
    assert "Traceback" not in err and "deepseek-vl2: server stopped" in err


def test_hub_id_without_network_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No name resolution: the cache is asked at once instead of after huggingface_hub's five retries (~25 s)."""
    import socket as socket_module

    from deepseek_vl.chat import ModelLoadError, resolve_model_folder
    from deepseek_vl.utils.hub import hub_unreachable

    def no_dns(*args, **kwargs):
        raise socket_module.gaierror(-2, "Name or service not known")

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket_module, "getaddrinfo", no_dns)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    hub_unreachable.cache_clear()
    try:
        started = time.perf_counter()
        with pytest.raises(FileNotFoundError, match="not in the local cache; pass a local folder"):
            DeepseekVLV2Processor.from_pretrained("deepseek-ai/deepseek-vl2-tiny", cache_dir=str(tmp_path))
        with pytest.raises(ModelLoadError, match="could not download 'deepseek-ai/deepseek-vl2-tiny'"):
            resolve_model_folder("deepseek-ai/deepseek-vl2-tiny")
        assert time.perf_counter() - started < 5
    finally:
        hub_unreachable.cache_clear()
