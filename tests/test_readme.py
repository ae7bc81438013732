"""Every Python block of README.md runs as written, so the README cannot rot: hub ids become the golden Tiny
checkpoint, `../shared/golden` the golden folder, generation lengths are cut to a few tokens. Blocks that talk to
the HTTP API (and the curl examples) run against a real `deepseek-vl2 serve` started as the README says.

A block preceded by the line `<!-- readme-test: skip (reason) -->` is not run (say why, e.g. it needs a GPU)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from golden import GOLDEN, checkpoint

REPO = Path(__file__).resolve().parents[1]
SKIP = "<!-- readme-test: skip"
SERVER_MARKERS = ("127.0.0.1:8000", "OpenAI(")


def readme_blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block in that language not marked to skip."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    blocks, start = [], None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == f"```{language}":
            skipped = number > 1 and lines[number - 2].strip().startswith(SKIP)
            start = None if skipped else number
            if skipped:
                continue
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start : number - 1])))
            start = None
    return blocks


def local(code: str, port: int = 8000) -> str:
    """The block with the golden checkpoint and images, short answers, and the test server's port."""
    code = code.replace("deepseek-ai/deepseek-vl2-tiny", str(checkpoint("tiny")))
    code = code.replace("../shared/golden", str(GOLDEN)).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return re.sub(r"max_(new_)?tokens([=:] ?)\d+", r"max_\1tokens\g<2>4", code)


def run_python(blocks: list[tuple[int, str]], port: int = 8000) -> subprocess.CompletedProcess:
    """All blocks in one interpreter (one torch import), each in a fresh namespace; stops at the first failure."""
    runner = "import runpy, sys, traceback\n"
    for line, code in blocks:
        runner += f"print('--- README block at line {line}', flush=True)\nexec(compile({local(code, port)!r}, 'README.md:{line}', 'exec'), {{}})\n"
    return subprocess.run(
        [sys.executable, "-c", runner], capture_output=True, text=True, timeout=600, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def test_readme_has_the_examples_it_should() -> None:
    python = [code for _, code in readme_blocks("python")]
    assert any("AutoModelForCausalLM.from_pretrained" in code for code in python)  # the model card's quick start
    assert any("VLChat.from_pretrained" in code for code in python)
    assert any("OpenAI(" in code for code in python)
    assert "issue #" not in (REPO / "README.md").read_text()


def test_python_blocks_run() -> None:
    blocks = [(line, code) for line, code in readme_blocks("python") if not any(m in code for m in SERVER_MARKERS)]
    result = run_python(blocks)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("--- README block at line") == len(blocks)
    assert "<|User|>: <image>\n<|ref|>The giraffe at the back.<|/ref|>." in result.stdout  # the quick start's print
    assert "Traceback" not in result.stderr and "tokenizer_config.json" not in result.stderr


@pytest.fixture(scope="module")
def server_port() -> int:
    """`deepseek-vl2 serve` as the README starts it (key from the environment), on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "deepseek_vl", "serve", "--model", str(checkpoint("tiny")), "--model-name",
               "tiny", "--port", str(port)]  # fmt: skip
    env = {**os.environ, "DEEPSEEK_VL2_API_KEY": "secret"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1, trust_env=False).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail(f"the server did not start: {server.stderr.read().decode()[-2000:]}")
    yield port
    server.send_signal(2)  # Ctrl-C: a clean stop
    try:
        assert server.wait(timeout=60) == 0
    finally:
        server.kill()


def test_api_python_blocks_run_against_the_server(server_port: int) -> None:
    blocks = [(line, code) for line, code in readme_blocks("python") if any(m in code for m in SERVER_MARKERS)]
    result = run_python(blocks, server_port)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("--- README block at line") == len(blocks)


def test_curl_examples_run_against_the_server(server_port: int, tmp_path: Path) -> None:
    blocks = [code for _, code in readme_blocks("bash") if "curl " in code]
    assert blocks
    for code in blocks:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", local(code.replace("curl ", "curl -sS --fail-with-body "), server_port)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert '"chat.completion' in result.stdout and "error" not in result.stdout
