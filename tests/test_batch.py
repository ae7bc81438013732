"""`deepseek-vl2 batch` on the golden Tiny checkpoint: per-line errors, resume by id or request hash after edits,
--retry-errors, exit status, input split on "\\n" only. One subprocess run end to end; the others in-process with
the session's loaded model, since what they check is the bookkeeping around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import deepseek_vl.serve.batch as batch
from deepseek_vl.chat import VLChat
from deepseek_vl.serve.cli import main
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
SMALL_IMAGE = GOLDEN / "images" / "tiny_8x8.png"


@pytest.fixture
def loads(tiny: VLChat, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The batch command with the already loaded model; records each load it asks for."""
    asked: list[str] = []

    def load(args):
        asked.append(args.model)
        return tiny

    monkeypatch.setattr(batch, "load_chat", load)
    return asked


def write_requests(path: Path) -> list[str]:
    (path.parent / "pic.png").write_bytes(SMALL_IMAGE.read_bytes())
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
    return requests


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_batch(*args: str) -> int:
    return main(["batch", *args, "--model", TINY, "--max-new-tokens", "3", "--batch-size", "2"])


def test_batch_end_to_end_answers_each_line_once_and_resumes(tmp_path: Path, loads: list[str], capsys) -> None:
    """The first run in a subprocess, as a user runs it; the resumed run in-process (the same code path)."""
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    write_requests(requests)
    args = [sys.executable, "-m", "deepseek_vl", "batch", str(requests), str(answers), "--model", TINY]
    args += ["--max-new-tokens", "3", "--batch-size", "2"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=os.environ)
    assert first.returncode == 1, first.stderr  # two lines failed
    assert "answering" in first.stderr and "line 2: not valid JSON" in first.stderr
    by_line = {r["line"]: r for r in records(answers)}
    assert sorted(by_line) == [1, 2, 3, 5, 6]
    assert by_line[1]["id"] == "a" and by_line[1]["completion_tokens"] == 3 and by_line[1]["prompt_tokens"] > 400
    assert by_line[3]["completion_tokens"] == 2
    assert "error" in by_line[2] and by_line[2]["id"] is None
    assert "missing.png" in by_line[5]["error"] and by_line[5]["id"] == "e"
    assert str(tmp_path / "missing.png") in by_line[5]["error"]  # resolved from the input's folder, and said so
    assert "relative paths resolve" not in by_line[5]["error"]
    assert by_line[6]["prompt_tokens"] > 800

    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text(lines[0] + lines[1][:10])  # as if killed while writing the second record
    assert run_batch(str(requests), str(answers)) == 1
    assert "4 lines answered (2 errors), 1 already done" in capsys.readouterr().err
    assert {r["line"]: r for r in records(answers)} == by_line  # greedy: the same answers, in input order


def test_resume_survives_edits_and_retries_errors_when_asked(tmp_path: Path, loads: list[str], capsys) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    lines = write_requests(requests)
    assert run_batch(str(requests), str(answers)) == 1
    first = {r["id"] or r["line"]: r for r in records(answers)}
    assert "rerun" not in capsys.readouterr().err

    # fix the broken JSON line, insert a line at the top: only the new and the fixed line are answered
    lines[1] = json.dumps({"prompt": "Fixed line."})
    lines.insert(0, json.dumps({"id": "new", "prompt": "Inserted."}))
    requests.write_text("\n".join(lines) + "\n")
    assert run_batch(str(requests), str(answers)) == 1  # line "e" still fails, from the first run
    err = capsys.readouterr().err
    assert "2 lines answered (0 errors), 4 already done" in err and "pass --retry-errors" in err
    second = records(answers)
    assert [r["line"] for r in second] == [1, 2, 3, 4, 6, 7]  # one record per input line, in input order
    assert [r["id"] for r in second] == ["new", "a", None, "c", "e", "f"]
    assert second[2]["completion_tokens"] == 3 and "error" not in second[2]
    for record in second:
        if record["id"] in first:
            assert {k: v for k, v in record.items() if k != "line"} == {
                k: v for k, v in first[record["id"]].items() if k != "line"
            }  # untouched answers kept as they were

    # the missing image appears: it is retried only with --retry-errors; then all is well and the status is 0
    (tmp_path / "missing.png").write_bytes(SMALL_IMAGE.read_bytes())
    assert run_batch(str(requests), str(answers)) == 1
    assert run_batch(str(requests), str(answers), "--retry-errors") == 0
    assert "1 lines answered (0 errors), 5 already done" in capsys.readouterr().err
    final = records(answers)
    assert len(final) == 6 and not any("error" in r for r in final)
    assert final[4]["id"] == "e" and final[4]["completion_tokens"] == 3

    # nothing left to do: the model is not even loaded
    loads.clear()
    assert run_batch(str(requests), str(answers)) == 0
    assert loads == []


def test_lines_without_ids_match_by_request_and_dropped_lines_are_kept(tmp_path: Path, loads: list[str]) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    one, two = json.dumps({"prompt": "One."}), json.dumps({"prompt": "Two.", "max_new_tokens": 2})
    requests.write_text(f"{one}\n{two}\n{two}\n")  # identical lines get one answer each
    assert run_batch(str(requests), str(answers)) == 0
    first = records(answers)
    assert [r["line"] for r in first] == [1, 2, 3]

    requests.write_text(f'{two}\n{{ "prompt" :  "One." }}\n')  # reordered, reformatted, one copy removed
    assert run_batch(str(requests), str(answers)) == 0
    second = records(answers)
    assert [(r["line"], r["text"]) for r in second[:2]] == [(1, first[1]["text"]), (2, first[0]["text"])]
    assert second[2]["text"] == first[2]["text"]  # the answer of the removed line is kept, at the end


def test_input_is_split_on_newlines_only_and_a_failing_line_does_not_stop_the_run(
    tmp_path: Path, tiny: VLChat, loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    separators = json.dumps({"id": "sep", "prompt": "a\u2028b\u2029c\x1cd\x85e"}, ensure_ascii=False)
    crash = json.dumps({"id": "crash", "prompt": "boom"})
    requests.write_text(separators + "\r\n" + crash + "\n" + json.dumps({"id": "ok", "prompt": "Hi"}) + "\n")
    from deepseek_vl.engine import Engine

    real = Engine.submit

    def submit(self, messages, *args, **options):  # an unexpected error type in one line's generation
        if messages[0]["content"] == "boom":
            raise TypeError("bad")
        return real(self, messages, *args, **options)

    monkeypatch.setattr(Engine, "submit", submit)
    assert run_batch(str(requests), str(answers)) == 1
    by_id = {r["id"]: r for r in records(answers)}
    assert set(by_id) == {"sep", "crash", "ok"}
    assert by_id["crash"]["error"] == "TypeError: bad"
    assert "error" not in by_id["sep"] and "error" not in by_id["ok"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (d / "in.jsonl", d / "no" / "out.jsonl"), "its folder does not exist"),
        (lambda d: (d / "in.jsonl", d / "in.jsonl"), "different file"),
        (lambda d: (d / "dup.jsonl", d / "out.jsonl"), "have the same id 'x'"),
    ],
)
def test_problems_found_before_the_model_loads(tmp_path: Path, loads: list[str], capsys, make, message) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    (tmp_path / "dup.jsonl").write_text('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    source, target = make(tmp_path)
    assert run_batch(str(source), str(target)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert loads == []


def test_unusable_image_paths_fail_their_own_line_only(tmp_path: Path, loads: list[str]) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    lines = [
        {"id": "nouser", "prompt": "Hi", "images": ["~nosuchuser_h10/x.png"]},
        {"id": "long", "prompt": "Hi", "images": ["a" * 5000]},
        {"id": "fifo", "prompt": "Hi", "images": ["/dev/null"]},
        {"id": "ok", "prompt": "Hi"},
    ]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_batch(str(requests), str(answers)) == 1
    by_id = {r["id"]: r for r in records(answers)}
    assert "home directory is unknown" in by_id["nouser"]["error"]
    assert "File name too long" in by_id["long"]["error"] and "not a regular file" in by_id["fifo"]["error"]
    assert "error" not in by_id["ok"]
