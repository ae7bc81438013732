"""`deepseek-vl2 batch` on the golden Tiny checkpoint: per-line errors, resume by id or request hash after edits,
stale answers answered again, --retry-errors, exit status, input split on "\\n" only, a file that is not an OUTPUT
never overwritten. One subprocess run end to end; the others in-process with
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


def test_lines_without_ids_match_by_request_and_dropped_answers_move_aside(tmp_path: Path, loads: list[str]) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    one, two = json.dumps({"prompt": "One."}), json.dumps({"prompt": "Two.", "max_new_tokens": 2})
    requests.write_text(f"{one}\n{two}\n{two}\n")  # identical lines get one answer each
    assert run_batch(str(requests), str(answers)) == 0
    first = records(answers)
    assert [r["line"] for r in first] == [1, 2, 3]

    requests.write_text(f'{two}\n{{ "prompt" :  "One." }}\n')  # reordered, reformatted, one copy removed
    assert run_batch(str(requests), str(answers)) == 0
    second = records(answers)
    assert [(r["line"], r["text"]) for r in second] == [(1, first[1]["text"]), (2, first[0]["text"])]
    assert records(tmp_path / "answers.stale.jsonl") == [first[2]]  # the removed line's answer, not lost


def test_edited_lines_are_answered_again_and_output_keeps_one_record_per_line(
    tmp_path: Path, loads: list[str], capsys
) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    lines = [{"id": "broken", "prompt": "Hi", "images": ["missing.png"]}, {"id": "kept", "prompt": "Hello"},
             {"id": "edited", "prompt": "Old question"}, {"prompt": "No id, old"}]  # fmt: skip
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_batch(str(requests), str(answers)) == 1
    first = records(answers)
    answers.write_bytes(answers.read_bytes().rstrip(b"\n"))  # a last record without its "\n" is kept as it is

    # the broken line fixed in INPUT (no --retry-errors needed), one line with an id and one without edited
    lines[0], lines[2]["prompt"], lines[3]["prompt"] = {"id": "broken", "prompt": "Hi"}, "New question", "No id, new"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert run_batch(str(requests), str(answers)) == 0
    assert "3 lines answered (0 errors), 1 already done" in capsys.readouterr().err
    second = records(answers)
    assert [(r["line"], r["id"]) for r in second] == [(1, "broken"), (2, "kept"), (3, "edited"), (4, None)]
    assert second[1] == first[1] and "error" not in second[0]
    assert second[2]["request_sha256"] != first[2]["request_sha256"]  # the new question's answer, not the stale one
    assert records(tmp_path / "answers.stale.jsonl") == first[2:]  # the edited lines' old answers; errors dropped


def test_a_file_that_is_not_an_output_is_never_overwritten(tmp_path: Path, loads: list[str], capsys) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "prompt": "Hi"}) + "\n" + json.dumps({"prompt": "Yo"}) + "\n")
    assert run_batch(str(requests), str(answers)) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text('my notes\n{"id": "a", "line": 1, "text": "x"}\nno newline at the end')
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    capsys.readouterr()
    for source, target in ((answers, requests), (requests, notes)):  # INPUT and OUTPUT swapped; a file of notes
        assert run_batch(str(source), str(target)) == 2
        err = capsys.readouterr().err
        assert f"{str(target)!r} is not an OUTPUT of deepseek-vl2 batch (line 1 " in err and err.count("\n") == 1
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before
    assert loads == [loads[0]]  # loaded for the first run only


def test_bad_options_fail_their_own_line(tmp_path: Path, loads: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from deepseek_vl import options

    real = options.GenerationOptions

    def unchecked(**values):  # a TypeError the options do not turn into a ValueError themselves
        if values.get("seed") == 7:
            raise TypeError("'int' object is not iterable")
        return real(**values)

    monkeypatch.setattr(options, "GenerationOptions", unchecked)
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    lines = [{"id": "int", "prompt": "Hi", "stop": 5}, {"id": "list", "prompt": "Hi", "stop": ["x", 5]},
             {"id": "type", "prompt": "Hi", "seed": 7}, {"id": "ok", "prompt": "Hi"}]  # fmt: skip
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert run_batch(str(requests), str(answers)) == 1
    by_id = {r["id"]: r for r in records(answers)}
    assert "stop must be" in by_id["int"]["error"] and "stop must be" in by_id["list"]["error"]
    assert by_id["type"]["error"].startswith("bad options {") and "not iterable" in by_id["type"]["error"]
    assert "error" not in by_id["ok"]


def test_input_may_start_with_a_bom_and_a_line_that_is_not_utf8_fails(tmp_path: Path, loads: list[str], capsys) -> None:
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_bytes(b'\xef\xbb\xbf{"id": "bom", "prompt": "Hi"}\n{"id": "latin1", "prompt": "caf\xe9"}\n')
    assert run_batch(str(requests), str(answers)) == 1
    first, second = records(answers)
    assert first["id"] == "bom" and "error" not in first
    assert second["line"] == 2 and second["error"] == "not UTF-8 (byte 32 of the line): save INPUT as UTF-8"
    assert "line 2: not UTF-8" in capsys.readouterr().err


def test_shard_and_merge_do_not_go_together(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "in.jsonl", "out.jsonl", "--shard", "1/2", "--merge", "2"])
    assert exit_info.value.code == 2 and "--merge: not allowed with argument --shard" in capsys.readouterr().err


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
        (lambda d: (d, d / "out.jsonl"), "is a directory: give a JSONL or Parquet file"),
        (lambda d: (d / "in.jsonl", d), "it is a directory; give OUTPUT as a file path"),
        (lambda d: (d / "in.jsonl", d / "dup.jsonl"), "is not an OUTPUT of deepseek-vl2 batch"),
    ],
)
def test_problems_found_before_the_model_loads(tmp_path: Path, loads: list[str], capsys, make, message) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    (tmp_path / "dup.jsonl").write_text('{"id": "x", "prompt": "a"}\n{"id": "x", "prompt": "b"}\n')
    before = {path: path.read_bytes() for path in tmp_path.iterdir()}
    source, target = make(tmp_path)
    assert run_batch(str(source), str(target)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert loads == []
    assert {path: path.read_bytes() for path in tmp_path.iterdir()} == before  # nothing written


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


def test_answers_made_with_other_settings_are_answered_again_and_kept_aside(tmp_path: Path, loads: list[str]) -> None:
    """A rerun with another model setting or generation default does not keep answers made with the old ones."""
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "prompt": "One."}) + "\n" + json.dumps({"id": "b", "prompt": "Two.",
                        "max_new_tokens": 2}) + "\n")  # fmt: skip
    assert run_batch(str(requests), str(answers)) == 0
    first = records(answers)

    assert main(["batch", str(requests), str(answers), "--model", TINY, "--max-new-tokens", "1"]) == 0
    second = records(answers)  # "b" sets its own max_new_tokens: its answer still holds
    assert second[0]["completion_tokens"] == 1 and second[1] == first[1]
    assert records(tmp_path / "answers.stale.jsonl") == [first[0]]

    loads.clear()
    assert main(["batch", str(requests), str(answers), "--model", TINY, "--max-new-tokens", "1", "--dtype",
                 "bfloat16"]) == 0  # fmt: skip
    assert loads == [TINY] and len(records(tmp_path / "answers.stale.jsonl")) == 3

    # records written before settings were recorded count as made with this run's settings
    answers.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "settings_sha256"}) + "\n"
                               for r in records(answers)))  # fmt: skip
    loads.clear()
    assert main(["batch", str(requests), str(answers), "--model", TINY, "--max-new-tokens", "5"]) == 0
    assert loads == []
