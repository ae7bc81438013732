"""Benchmark tasks: how a data record becomes a prompt, and how the answer is scored.

Data files are JSONL, one sample per line, in each benchmark's usual fields (image paths are relative to the file):

    refcoco     {"id", "image", "expression", "bbox": [x, y, w, h]}          (COCO pixels; score: IoU >= 0.5)
    docvqa      {"id", "image", "question", "answers": ["...", ...]}          (score: ANLS)
    vqa         {"id", "image", "question", "answers": [10 human answers]}    (score: VQA accuracy; strings or
                                                                               the official {"answer": ...} objects)
    mmmu-style  {"id", "images" (or "image"), "question", "options": [...] or {"A": ...}, "answer": "B", "hint"?}

Prompts are the ones DeepSeek-VL2 is evaluated with: the model card's grounding prompt for RefCOCO, and
VLMEvalKit's (its DeepSeek-VL2 wrapper, PR #697) for the others: "Answer the question using a single word or
phrase." after a VQA question; for multiple choice the options as "A. ..." lines, the "Question:"/"Options:"
labels dropped, the letter instruction, `<image>` tags first, and the first image enlarged 2x (bilinear; written
as a lossless PNG into the run's scratch folder, so a data set's enlarged images are never all in memory at once).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from deepseek_vl.eval.metrics import anls, box_iou, extract_option, vqa_accuracy
from deepseek_vl.grounding import parse_grounding

__all__ = ["TASKS", "Task"]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly. Answer the question using a " \
                "single word or phrase.\n"  # fmt: skip
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    fields: tuple[str, ...]  # required keys of a data record
    build: Callable[[dict[str, Any], Path, Path], tuple[str, list]]  # record, data folder, scratch -> prompt, images
    score: Callable[[dict[str, Any], str, Path], dict[str, Any]]  # record, answer text, folder -> {"score", ...}
    max_new_tokens: int

    def check(self, record: Any) -> None:
        if not isinstance(record, dict):
            raise ValueError("a sample must be a JSON object")
        if missing := [key for key in self.fields if key not in record]:
            raise ValueError(f"{self.name} sample lacks {missing}; it needs {list(self.fields)}")


def _image(record: dict[str, Any], folder: Path) -> str:
    path = Path(str(record["image"])).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _answers(record: dict[str, Any]) -> list[str]:
    """The accepted answers: strings, or the official VQA annotation's {"answer": ..., "answer_id": ...} objects."""
    answers = record["answers"]
    if isinstance(answers, str) or not isinstance(answers, list) or not answers:
        raise ValueError('"answers" must be a non-empty list of strings')
    return [str(answer["answer"]) if isinstance(answer, dict) and "answer" in answer else str(answer)
            for answer in answers]  # fmt: skip


def _bbox(record: dict[str, Any]) -> tuple[float, float, float, float]:
    """The ground-truth [x, y, w, h], checked before any answer is generated so a bad one is that line's error."""
    bbox = record["bbox"]
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f'"bbox" must be 4 numbers [x, y, w, h] (COCO pixels), got {bbox!r}') from None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        raise ValueError(f'"bbox" must be finite with width and height > 0, got {bbox!r}')
    return x, y, w, h


def _build_refcoco(record: dict[str, Any], folder: Path, scratch: Path) -> tuple[str, list]:
    _bbox(record)
    return f"<|ref|>{record['expression']}<|/ref|>.", [_image(record, folder)]


def _score_refcoco(record: dict[str, Any], text: str, folder: Path) -> dict[str, Any]:
    x, y, w, h = _bbox(record)
    with Image.open(_image(record, folder)) as image:
        size = image.size
    boxes = parse_grounding(text, [size]).boxes
    if not boxes:
        return {"score": 0.0, "iou": None, "predicted_box": None, "num_boxes": 0}
    predicted = list(boxes[0].pixels)  # several boxes: the first one is the answer
    iou = box_iou(predicted, [x, y, x + w, y + h])
    return {"score": float(iou >= 0.5), "iou": iou, "predicted_box": predicted, "num_boxes": len(boxes)}


def _build_vqa(record: dict[str, Any], folder: Path, scratch: Path) -> tuple[str, list]:
    return f"{record['question']}{SHORT_ANSWER}", [_image(record, folder)]


def _score_docvqa(record: dict[str, Any], text: str, folder: Path) -> dict[str, Any]:
    return {"score": anls(text, _answers(record))}


def _score_vqa(record: dict[str, Any], text: str, folder: Path) -> dict[str, Any]:
    return {"score": vqa_accuracy(text, _answers(record))}


def _options(record: dict[str, Any]) -> dict[str, str]:
    options = record["options"]
    if isinstance(options, list):
        options = dict(zip(LETTERS, options))
    if not isinstance(options, dict) or not options:
        raise ValueError('"options" must be a non-empty list or a {"A": ..., "B": ...} object')
    return {str(letter): str(text) for letter, text in options.items()}


def _build_choice(record: dict[str, Any], folder: Path, scratch: Path) -> tuple[str, list]:
    sources = record.get("images", [record["image"]] if "image" in record else [])
    if not isinstance(sources, list) or not sources:
        raise ValueError('a mmmu-style sample needs "images" (a non-empty list) or "image"')
    images = [_image({"image": source}, folder) for source in sources]
    hint = f"Hint: {record['hint']}\n" if record.get("hint") else ""
    options = "".join(f"{letter}. {text}\n" for letter, text in _options(record).items())
    # VLMEvalKit's prompt with the DeepSeek-VL2 wrapper's edits applied (labels dropped, letter instruction)
    text = f"{hint} {record['question']}\n{options}{LETTER_ANSWER} \n"
    placeholders = "".join(f"<image {index}>" for index in range(1, len(images) + 1))
    with Image.open(images[0]) as source:
        first = source.convert("RGB")
    enlarged = first.resize((2 * first.width, 2 * first.height), Image.BILINEAR)
    with tempfile.NamedTemporaryFile(dir=scratch, prefix="enlarged-", suffix=".png", delete=False) as file:
        enlarged.save(file, format="PNG")  # lossless: the model sees the exact enlarged pixels
    return "<image>" * len(images) + "\n" + placeholders + text, [file.name, *images[1:]]


def _score_choice(record: dict[str, Any], text: str, folder: Path) -> dict[str, Any]:
    options = _options(record)
    if str(record["answer"]) not in options:
        raise ValueError(f'"answer" {record["answer"]!r} is not one of the option letters {list(options)}')
    extracted = extract_option(text.rstrip("."), options)
    return {"score": float(extracted == str(record["answer"])), "extracted": extracted}


TASKS = {
    "refcoco": Task("refcoco", "accuracy@IoU0.5", ("image", "expression", "bbox"), _build_refcoco,
                    _score_refcoco, 64),
    "docvqa": Task("docvqa", "ANLS", ("image", "question", "answers"), _build_vqa, _score_docvqa, 64),
    "vqa": Task("vqa", "VQA accuracy", ("image", "question", "answers"), _build_vqa, _score_vqa, 64),
    "mmmu-style": Task("mmmu-style", "accuracy", ("question", "options", "answer"), _build_choice,
                       _score_choice, 64),
}  # fmt: skip
