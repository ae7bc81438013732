"""`deepseek-vl2 eval` against the reference scorers on their edge cases, and data files with bad lines: each bad
line is that line's error (named by its line in the file), found before any answer is generated, and never
stops the run or leaves the denominator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl import distributed
from deepseek_vl.eval import cli as eval_cli
from deepseek_vl.eval.metrics import anls


def test_anls_as_the_official_docvqa_scorer() -> None:
    """The RRC DocVQA/InfographicVQA script: distance between the folded strings, divided by the longer raw
    string, and a question scores 0 only when its similarity is below the threshold."""
    assert anls("ab", ["ac"]) == 0.5  # 1 edit / 2 characters: similarity 0.5 is not below 0.5
    assert anls(" helo ", ["hello"]) == pytest.approx(1 - 1 / 6)  # 1 edit / len(" helo ") = 6
    assert anls("helo", ["Hello "]) == pytest.approx(1 - 1 / 6)  # 1 edit / len("Hello ") = 6
    assert anls("  HeLLo   World ", ["hello world"]) == 1.0  # no edit: the denominator does not matter
    assert anls("abc", ["xyz"]) == 0.0


def run(monkeypatch, tmp_path: Path, task: str, text: str, **flags) -> tuple[dict, list[dict], list[int]]:
    """The command on a data file with given answers; returns the summary, the predictions and the lines asked."""
    asked: list[int] = []

    def fake_answer(rows, *args):
        for line, _ in rows:
            asked.append(line)
            yield line, {"text": "<|ref|>a<|/ref|><|det|>[[100, 100, 300, 300]]<|/det|>", "finish_reason": "stop"}

    monkeypatch.setattr(eval_cli, "_answer", fake_answer)
    data = tmp_path / f"{task}.jsonl"
    data.write_text(text, encoding="utf-8")
    summary = eval_cli.evaluate(task, data, model="unused", output_dir=tmp_path / "out", **flags)
    written = (tmp_path / "out" / f"{task}_predictions.jsonl").read_text(encoding="utf-8")
    return summary, [json.loads(line) for line in written.splitlines()], asked


def test_refcoco_bad_boxes_are_their_lines_errors(monkeypatch, tmp_path: Path) -> None:
    Image.new("RGB", (999, 999)).save(tmp_path / "square.png")
    good = {"image": "square.png", "expression": "a", "bbox": [100, 100, 200, 200]}
    bad = [None, [1, 2, 3], "10,20,30,40", [0, 0, 0, 10], [0, 0, float("nan"), 10], 7]
    text = "".join(json.dumps(good | {"id": n, "bbox": bbox}) + "\n" for n, bbox in enumerate(bad)) + json.dumps(good)
    summary, predictions, asked = run(monkeypatch, tmp_path, "refcoco", text)
    assert summary["samples"] == 7 and summary["errors"] == 6 and summary["score"] == pytest.approx(1 / 7)
    assert all('"bbox" must be' in p["error"] for p in predictions[:6]) and predictions[6]["score"] == 1.0
    assert asked == [7]  # only the good line is answered


def test_errors_name_the_line_of_the_file(monkeypatch, tmp_path: Path) -> None:
    Image.new("RGB", (999, 999)).save(tmp_path / "square.png")
    good = json.dumps({"image": "square.png", "expression": "a", "bbox": [100, 100, 200, 200]})
    text = "\ufeff" + good + "\n\n\n{not json\n\n" + good + "\n"  # a BOM, blank lines: lines 1, 4 and 6 count
    summary, predictions, asked = run(monkeypatch, tmp_path, "refcoco", text)
    assert [p["line"] for p in predictions] == [1, 4, 6] and asked == [1, 6]
    assert summary["errors"] == 1 and "JSONDecodeError" in predictions[1]["error"]
    assert predictions[0]["score"] == 1.0  # the BOM is not part of the first line's JSON
    limited, predictions, _ = run(monkeypatch, tmp_path, "refcoco", text, limit=2)
    assert limited["samples"] == 2 and [p["line"] for p in predictions] == [1, 4]


def test_no_answerable_line_starts_no_cluster(monkeypatch, tmp_path: Path) -> None:
    def no_cluster(*args, **kwargs):
        raise AssertionError("Ray started for nothing")

    monkeypatch.setattr(distributed, "run_ray_batch", no_cluster)
    data = tmp_path / "vqa.jsonl"
    data.write_text('{"id": 1}\n{oops\n', encoding="utf-8")
    summary = eval_cli.evaluate("vqa", data, model="unused", output_dir=tmp_path / "out", ray=True)
    assert summary["samples"] == 2 and summary["errors"] == 2 and summary["score"] == 0.0
