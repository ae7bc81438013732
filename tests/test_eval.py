"""`deepseek-vl2 eval`: the metrics on hand-made samples whose values are worked out by hand in the comments, the
scoring of whole data files (answers given, so every edge case is exact), and the command end to end on the golden
Tiny checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from PIL import Image

from deepseek_vl.eval import cli as eval_cli
from deepseek_vl.eval.metrics import anls, box_iou, extract_option, normalize_vqa_answer, vqa_accuracy
from deepseek_vl.eval.tasks import TASKS
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))


def test_box_iou() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 5, 15, 15]) == pytest.approx(25 / 175)  # 5x5 overlap; 100 + 100 - 25
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    assert box_iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0  # no area


def test_anls() -> None:
    assert anls("  HeLLo   World ", ["hello world"]) == 1.0  # case and whitespace folded
    assert anls("helo", ["hello"]) == pytest.approx(0.8)  # 1 edit / 5 characters
    assert anls("hel", ["hello", "help"]) == pytest.approx(0.75)  # best answer: "help", 1 edit / 4
    assert anls("abc", ["abd"]) == pytest.approx(2 / 3)  # 1 edit / 3 = 0.33, under the 0.5 threshold
    assert anls("abc", ["xyz"]) == 0.0  # 3 edits / 3 = 1.0 >= 0.5: no credit


def test_vqa_normalisation_and_accuracy() -> None:
    assert normalize_vqa_answer("The dog, isnt it?") == "dog isn't it"
    assert normalize_vqa_answer("Two.") == "2"
    assert normalize_vqa_answer("1.5") == "1.5"  # a period before a digit stays
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    # humans disagree: their answers lose punctuation ("2." -> "2") but not number words ("two" stays);
    # 3 humans say "2": leaving one of them out leaves 2 matches (2/3), leaving another out 3 (1) -> (3*2/3 + 7)/10
    assert vqa_accuracy("2", ["2", "2", "two", "2.", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.9)
    assert vqa_accuracy("yes", ["no"] * 10) == 0.0
    assert vqa_accuracy("one", ["1", "1", "3", "3", "3", "3", "3", "3", "3", "3"]) == pytest.approx(0.6)  # 2 match
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("B", "B"), ("(B) dog", "B"), ("B. dog", "B"), ("The answer is C.", "C"), ("Answer: A", "A"), ("dog", "B"),
     ("A cat", None), ("the answer is a cat", None), ("I am not sure", None), ("", None), ("D", None)],
)  # fmt: skip
def test_option_extraction(answer: str, expected: str | None) -> None:
    assert extract_option(answer, {"A": "cat", "B": "dog", "C": "bird"}) == expected


def write(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def score_with_answers(monkeypatch, tmp_path: Path, task: str, records: list, answers: list[str]) -> tuple:
    """Run the command's scoring with given answers (the model is tested end to end below)."""

    def fake_answer(rows, *args):
        for line, _ in rows:
            yield line, {"text": answers[line - 1], "finish_reason": "stop"}

    monkeypatch.setattr(eval_cli, "_answer", fake_answer)
    data = write(tmp_path / f"{task}.jsonl", records)
    summary = eval_cli.evaluate(task, data, model="unused", output_dir=tmp_path / "out")
    written = (tmp_path / "out" / f"{task}_predictions.jsonl").read_text()
    predictions = [json.loads(line) for line in written.splitlines()]
    assert json.loads((tmp_path / "out" / f"{task}_summary.json").read_text()) == summary
    return summary, predictions


def test_refcoco_file(monkeypatch, tmp_path: Path) -> None:
    Image.new("RGB", (999, 999)).save(tmp_path / "square.png")  # 999 px: pixel coordinates equal the 0..999 ones
    records = [
        {"id": "exact", "image": "square.png", "expression": "a", "bbox": [100, 100, 200, 200]},
        {"id": "shifted", "image": "square.png", "expression": "a", "bbox": [200, 100, 200, 200]},
        {"id": "missing", "image": "square.png", "expression": "a", "bbox": [0, 0, 100, 100]},
        {"id": "several", "image": "square.png", "expression": "a", "bbox": [0, 0, 100, 100]},
        {"id": "half", "image": "square.png", "expression": "a", "bbox": [0, 0, 100, 100]},
        {"id": "no bbox", "image": "square.png", "expression": "a"},
    ]
    answers = [
        "<|ref|>a<|/ref|><|det|>[[100, 100, 300, 300]]<|/det|>",  # IoU 1
        "<|ref|>a<|/ref|><|det|>[[100, 100, 300, 300]]<|/det|>",  # 100x200 overlap / (40000 + 40000 - 20000) = 1/3
        "I cannot find it.",  # no box: wrong
        "<|ref|>a<|/ref|><|det|>[[500, 500, 600, 600]], [[0, 0, 100, 100]]<|/det|>",  # only the first box counts
        "<|ref|>a<|/ref|><|det|>[[0, 0, 200, 100]]<|/det|>",  # IoU exactly 0.5 counts
        "",
    ]
    summary, predictions = score_with_answers(monkeypatch, tmp_path, "refcoco", records, answers)
    assert [p["score"] for p in predictions] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert summary["score"] == pytest.approx(2 / 6) and summary["errors"] == 1 and summary["unparsed_answers"] == 1
    assert predictions[1]["iou"] == pytest.approx(1 / 3) and predictions[0]["predicted_box"] == [100, 100, 300, 300]
    assert predictions[2]["num_boxes"] == 0 and predictions[3]["num_boxes"] == 2
    assert predictions[0]["prompt"] == "<|ref|>a<|/ref|>."
    assert "lacks ['bbox']" in predictions[5]["error"]


def test_docvqa_and_vqa_files(monkeypatch, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "page.png")
    records = [
        {"id": 1, "image": "page.png", "question": "Date?", "answers": ["1 May 2020", "May 1, 2020"]},
        {"id": 2, "image": "page.png", "question": "Name?", "answers": ["hello"]},
        {"id": 3, "image": "page.png", "question": "Code?", "answers": ["xyz"]},
        {"id": 4, "image": "page.png", "question": "Title?", "answers": ["hello world"]},
    ]
    answers = ["May 1, 2020", "helo", "abc", "  HeLLo   World "]  # ANLS 1, 0.8, 0, 1
    summary, predictions = score_with_answers(monkeypatch, tmp_path, "docvqa", records, answers)
    assert summary["score"] == pytest.approx(0.7) and summary["metric"] == "ANLS"
    assert predictions[0]["prompt"] == "Date?\nAnswer the question using a single word or phrase."

    vqa = [
        {"id": 1, "image": "page.png", "question": "How many?", "answers": ["2"] * 10},
        {"id": 2, "image": "page.png", "question": "How many?", "answers": ["2", "2", "two", "2.", *["3"] * 6]},
        {"id": 3, "image": "page.png", "question": "Is it?", "answers": ["no"] * 10},
        {"id": 4, "image": "page.png", "question": "What?",
         "answers": [{"answer": a, "answer_id": n} for n, a in enumerate(["dog"] * 3 + ["cat"] * 7, 1)]},
    ]  # fmt: skip
    answers = ["Two", "2", "yes", "The dog."]  # 1, 0.9, 0, (3 * 2/3 + 7) / 10 = 0.9 (official annotation format)
    summary, _ = score_with_answers(monkeypatch, tmp_path, "vqa", vqa, answers)
    assert summary["score"] == pytest.approx(0.7) and summary["errors"] == 0


def test_multiple_choice_file(monkeypatch, tmp_path: Path) -> None:
    Image.new("RGB", (10, 6)).save(tmp_path / "q.png")
    base = {"images": ["q.png"], "question": "Which animal is in <image 1>?", "options": ["cat", "dog", "bird"]}
    records = [base | {"answer": "B"}, base | {"answer": "C"}, base | {"answer": "B"}, base | {"answer": "B"},
               base | {"answer": "B"}, base | {"answer": "Z"}]  # fmt: skip
    answers = ["B", "The answer is (C).", "dog.", "I am not sure", "A", "A"]  # right, right, right, unread, wrong
    summary, predictions = score_with_answers(monkeypatch, tmp_path, "mmmu-style", records, answers)
    assert [p["score"] for p in predictions] == [1, 1, 1, 0, 0, 0]
    assert summary["score"] == pytest.approx(0.5) and summary["unparsed_answers"] == 1
    assert [p.get("extracted") for p in predictions[:5]] == ["B", "C", "B", None, "A"]
    assert "'Z' is not one of the option letters" in predictions[5]["error"]
    assert predictions[0]["prompt"] == (
        "<image>\n<image 1> Which animal is in <image 1>?\nA. cat\nB. dog\nC. bird\nAnswer with the option's letter "
        "from the given choices directly. Answer the question using a single word or phrase.\n \n"
    )


def test_multiple_choice_enlarges_the_first_image(tmp_path: Path) -> None:
    from deepseek_vl.utils.io import load_image

    Image.new("RGB", (10, 6), (200, 10, 10)).save(tmp_path / "q.png")
    (tmp_path / "scratch").mkdir()
    _, images = TASKS["mmmu-style"].build({"image": "q.png", "question": "?", "options": ["a"], "answer": "A"},
                                          tmp_path, tmp_path / "scratch")  # fmt: skip
    assert load_image(images[0]).size == (20, 12)
    assert Path(images[0]).parent == tmp_path / "scratch"


def test_enlarged_images_wait_on_disk_and_are_removed(monkeypatch, tmp_path: Path) -> None:
    """A data set's enlarged images are files while the run answers (not all in memory), gone after it."""
    Image.new("RGB", (10, 6), (200, 10, 10)).save(tmp_path / "q.png")
    seen = []

    def fake_answer(rows, *args):
        for line, row in rows:
            with Image.open(row["images"][0]) as enlarged:
                seen.append(enlarged.size)
            yield line, {"text": "A", "finish_reason": "stop"}

    monkeypatch.setattr(eval_cli, "_answer", fake_answer)
    record = {"image": "q.png", "question": "?", "options": ["a", "b"], "answer": "A"}
    data = write(tmp_path / "mc.jsonl", [record, record])
    summary = eval_cli.evaluate("mmmu-style", data, model="unused", output_dir=tmp_path / "out")
    assert summary["score"] == 1.0 and seen == [(20, 12), (20, 12)]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "mmmu-style_answers.jsonl", "mmmu-style_predictions.jsonl", "mmmu-style_summary.json"
    ]


def test_limit_and_bad_lines(monkeypatch, tmp_path: Path) -> None:
    records = ["{not json", {"id": 2, "question": "no image", "answers": ["a"]}, {"id": 3}]
    summary, predictions = score_with_answers(monkeypatch, tmp_path, "vqa", records[:2] + [records[2]], ["", "", ""])
    assert summary["errors"] == 3 and summary["score"] == 0.0
    assert "JSONDecodeError" in predictions[0]["error"] and "lacks ['image']" in predictions[1]["error"]
    limited = eval_cli.evaluate("vqa", tmp_path / "vqa.jsonl", model="unused", output_dir=tmp_path / "o", limit=1)
    assert limited["samples"] == 1


def test_end_to_end_on_the_golden_checkpoint(tmp_path: Path, load_model, capsys) -> None:
    """The command's answers are VLChat's for the task prompt, and its score is the metric of those answers."""
    from deepseek_vl.chat import VLChat
    from deepseek_vl.models import DeepseekVLV2Processor

    for name in ("tiny_8x8.png", "gray_300x200.png"):
        (tmp_path / name).write_bytes((GOLDEN / "images" / name).read_bytes())
    records = [
        {"id": "q1", "image": "tiny_8x8.png", "question": "What color?", "answers": ["black"] * 10},
        {"id": "q2", "image": "gray_300x200.png", "question": "How many?", "answers": ["2"] * 10},
    ]
    data = write(tmp_path / "vqa.jsonl", records)
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers())
    args = ["eval", "--task", "vqa", "--data", str(data), "--model", TINY, "--device", "cpu"]
    flags = ["--output-dir", str(tmp_path / "out"), "--max-new-tokens", "4", "--batch-size", "2"]
    args = parser.parse_args([*args, *flags])
    assert args.handler(args) == 0
    printed = json.loads(capsys.readouterr().out)
    predictions = [json.loads(line) for line in (tmp_path / "out" / "vqa_predictions.jsonl").read_text().splitlines()]

    pipe = VLChat(load_model("tiny"), DeepseekVLV2Processor.from_pretrained(TINY))
    for record, prediction in zip(records, predictions):
        prompt = f"{record['question']}\nAnswer the question using a single word or phrase."
        expected = pipe.chat([{"role": "user", "content": prompt, "images": [str(tmp_path / record["image"])]}],
                             max_new_tokens=4)  # fmt: skip
        assert prediction["answer"] == expected.text and prediction["id"] == record["id"]
        assert prediction["score"] == vqa_accuracy(expected.text, record["answers"])
    assert printed["samples"] == 2 and printed["errors"] == 0
    assert printed["score"] == sum(p["score"] for p in predictions) / 2

    # the continuous-batching engine gives the same answers
    engine = eval_cli.evaluate("vqa", data, model=TINY, device="cpu", output_dir=tmp_path / "engine", max_new_tokens=4,
                               engine=True)  # fmt: skip
    assert engine["answered_by"] == "engine" and engine["score"] == printed["score"]
    by_engine = [json.loads(line) for line in (tmp_path / "engine" / "vqa_predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in by_engine] == [p["answer"] for p in predictions]


def test_eval_is_a_command_and_builds_its_parser_without_torch() -> None:
    import subprocess
    import sys

    from deepseek_vl.serve.cli import SUBCOMMANDS

    assert SUBCOMMANDS["eval"] == "deepseek_vl.eval.cli:add_parser"
    code = "import sys; from deepseek_vl.serve.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow
def test_eval_on_ray_gives_the_local_answers(tmp_path: Path) -> None:
    (tmp_path / "q.png").write_bytes((GOLDEN / "images" / "tiny_8x8.png").read_bytes())
    records = [{"id": n, "image": "q.png", "question": q, "answers": ["a"] * 10} for n, q in enumerate(["Hi?", "Why?"])]
    data = write(tmp_path / "vqa.jsonl", records + [{"id": 9, "image": "none.png", "question": "?", "answers": ["a"]}])
    runs = {}
    for way, flags in (("batches", {}), ("ray", {"ray": True, "concurrency": 2})):
        summary = eval_cli.evaluate("vqa", data, model=TINY, device="cpu", output_dir=tmp_path / way, max_new_tokens=3,
                                    batch_size=1, **flags)  # fmt: skip
        assert summary["answered_by"] == way and summary["errors"] == 1  # the missing image, recorded
        runs[way] = (tmp_path / way / "vqa_predictions.jsonl").read_text()
    assert runs["ray"] == runs["batches"]


def test_resume_answers_only_what_an_interrupted_run_left(monkeypatch, tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    records = [{"id": n, "image": "a.png", "question": f"q{n}", "answers": ["yes"] * 10} for n in range(4)]
    data = write(tmp_path / "vqa.jsonl", records)
    asked = []

    def answer_until(stop_after):
        def fake_answer(rows, *args):
            for line, row in rows:
                if len(asked) == stop_after:
                    raise KeyboardInterrupt
                asked.append(line)
                yield line, {"text": "yes" if line != 3 else "no", "finish_reason": "stop"}

        return fake_answer

    out = tmp_path / "out"
    monkeypatch.setattr(eval_cli, "_answer", answer_until(2))
    with pytest.raises(KeyboardInterrupt):
        eval_cli.evaluate("vqa", data, model="m", output_dir=out)
    with (out / "vqa_answers.jsonl").open("a") as journal:
        journal.write('{"key": "cut sh')  # the interrupted write
    assert asked == [1, 2]
    monkeypatch.setattr(eval_cli, "_answer", answer_until(99))
    summary = eval_cli.evaluate("vqa", data, model="m", output_dir=out, resume=True)
    assert asked == [1, 2, 3, 4] and summary["resumed"] == 2 and summary["score"] == pytest.approx(0.75)
    # other settings, or no --resume: everything is answered again
    asked.clear()
    assert eval_cli.evaluate("vqa", data, model="m", output_dir=out, resume=True, max_new_tokens=5)["resumed"] == 0
    assert asked == [1, 2, 3, 4]
    asked.clear()
    assert eval_cli.evaluate("vqa", data, model="m", output_dir=out)["resumed"] == 0 and asked == [1, 2, 3, 4]
    assert eval_cli.evaluate("vqa", data, model="m", output_dir=out, resume=True)["resumed"] == 4
    # a model folder named another way (relative, absolute) is the same model
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert eval_cli.evaluate("vqa", data, model="model", output_dir=out)["resumed"] == 0
    assert eval_cli.evaluate("vqa", data, model=str(tmp_path / "model"), output_dir=out, resume=True)["resumed"] == 4
