"""The `deepseek-vl2` command end to end on the golden Tiny checkpoint (subprocesses, and a pseudo-terminal for
the REPL); argument errors and --help in-process, since they never load the model."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl.chat import VLChat
from deepseek_vl.models import DeepseekVLV2Processor
from deepseek_vl.serve.cli import build_parser, main
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
GIRAFFES = str(GOLDEN / "images" / "visual_grounding_1.jpeg")
SMALL_IMAGE = str(GOLDEN / "images" / "tiny_8x8.png")
GROUNDING_PROMPT = "<|ref|>The giraffe at the back.<|/ref|>."


@pytest.fixture(scope="module")
def tiny(load_model) -> VLChat:
    return VLChat(load_model("tiny"), DeepseekVLV2Processor.from_pretrained(TINY))


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


def test_generate_json_and_annotate(tiny: VLChat, tmp_path: Path) -> None:
    """Also checks that generation options reach chat(): the same call in-process gives the same JSON."""
    options = {"system_prompt": "Answer briefly.", "chunk_size": 256, "temperature": 0.5, "seed": 7, "stop": "zz"}
    messages = [{"role": "user", "content": GROUNDING_PROMPT, "images": [GIRAFFES]}]
    expected = tiny.chat(messages, max_new_tokens=5, **options)
    out = tmp_path / "boxes.png"
    args = ("generate", GROUNDING_PROMPT, "-i", GIRAFFES, "--model", TINY, "--max-new-tokens", "5")
    flags = ("--system-prompt", "Answer briefly.", "--chunk-size", "256", "--temperature", "0.5", "--seed", "7")
    run = cli(*args, *flags, "--stop", "zz", "--json", "--annotate", str(out))
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
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


def write_requests(path: Path) -> None:
    (path.parent / "pic.png").write_bytes(Path(SMALL_IMAGE).read_bytes())
    requests = [
        json.dumps({"id": "a", "prompt": "Describe the image.", "images": ["pic.png"]}),
        "{not json",
        json.dumps({"id": "c", "messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 2}),
        "",
        json.dumps({"id": "e", "prompt": "What is this?", "images": ["missing.png"]}),
        json.dumps({"id": "f", "messages": [{"role": "user", "content": "<image> vs <image>"}],
                    "images": ["pic.png", str(path.parent / "pic.png")]}),
    ]  # fmt: skip
    path.write_text("\n".join(requests) + "\n")


def test_batch_answers_each_line_once_and_resumes(tmp_path: Path) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    write_requests(requests)
    args = ("batch", str(requests), str(answers), "--model", TINY, "--max-new-tokens", "3", "--batch-size", "2")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert "answering" in first.stderr and "line 2: not valid JSON" in first.stderr
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6]
    by_line = {r["line"]: r for r in records}
    assert by_line[1]["id"] == "a" and by_line[1]["completion_tokens"] == 3 and by_line[1]["prompt_tokens"] > 400
    assert by_line[3]["completion_tokens"] == 2
    assert "error" in by_line[2] and by_line[2]["id"] is None
    assert "missing.png" in by_line[5]["error"] and by_line[5]["id"] == "e"
    assert by_line[6]["prompt_tokens"] > 800

    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text(lines[0] + lines[1][:10])  # as if killed while writing line 2
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    resumed = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(r["line"] for r in resumed) == [1, 2, 3, 5, 6]
    assert {r["line"]: r for r in resumed} == by_line  # greedy: the same answers again


def test_batch_refuses_an_output_of_another_input(tmp_path: Path, capsys) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    write_requests(requests)
    answers.write_text(json.dumps({"id": "zzz", "line": 1, "text": "x"}) + "\n")
    assert main(["batch", str(requests), str(answers), "--model", TINY]) == 2
    assert "belongs to another input" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("generate", ["--json", "--annotate", "--image", "prompt"]),
        ("chat", ["--image"]),
        ("batch", ["--batch-size", "INPUT", "OUTPUT", '"messages"', "resum"]),
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
    assert all(command in text for command in ("generate", "chat", "batch"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hi", "--temperature", "3"], "temperature must be a number in [0, 2]"),
        (["generate", "hi", "--top-p", "0"], "top_p must be"),
        (["generate", "hi", "--max-new-tokens", "many"], "invalid value 'many'"),
        (["generate", "hi", "--dtype", "int8"], "invalid choice"),
        (["batch", "in.jsonl", "out.jsonl", "--batch-size", "0"], "must be a whole number >= 1"),
        (["generate", "hi", "--annotate", "out.png"], "--annotate needs at least one --image"),
        (["generate", "hi", "-i", GIRAFFES, "--annotate", "boxes.txt"], "use an image file extension"),
        (["batch", "/no/requests.jsonl", "out.jsonl"], "does not exist"),
        (["generate", "hi", "--device", "tpu9"], "unknown device"),
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


def test_extension_commands_are_listed_and_loaded_only_when_named() -> None:
    """serve/demo come from their own modules; `generate` must not pay for importing FastAPI and Gradio."""
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert set(subcommands) == {"generate", "chat", "batch", "serve", "demo"}
    probe = (
        "import sys; from deepseek_vl.serve.cli import SUBCOMMANDS, build_parser; build_parser(['generate']); "
        "print(sorted(m for m in ('fastapi', 'gradio') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


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


def test_chat_repl_in_a_terminal(tiny: VLChat) -> None:
    """A question stopped with Ctrl-C, /reset, a bad /image, /image + a question, a follow-up (history kept), /exit."""
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
        terminal.send(f"/image {SMALL_IMAGE}\r")
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
